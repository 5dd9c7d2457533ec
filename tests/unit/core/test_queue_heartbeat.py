"""A slow store call inside an attempt must not look like a dead replica: store calls run in threads, so the queue
worker's heartbeat (on the API worker's event loop) keeps beating, and no other replica takes the task over."""

from __future__ import annotations

import asyncio
import threading
import time

import psycopg

from core.settings import get_settings
from state import job_queue
from state.job_queue import MriQueue, prepare_database
from state.pg_tasks import TABLE, PostgresTaskStore
from tests.unit.core.test_connection_budget import wait_for

SLOW_CALL_S = job_queue.STALLED_AFTER_S + 2 * job_queue.STALL_CHECK_S
"""Longer than a silent worker may be before another replica takes its jobs."""


def test_a_store_call_slower_than_the_takeover_delay_causes_no_takeover(api_worker: str) -> None:
    prepare_database(api_worker)
    tasks = PostgresTaskStore.from_settings(get_settings())
    slow, other = (MriQueue(tasks, api_worker, name, shutdown_grace_s=4.0) for name in ("slow", "other"))
    taken_over: list[str] = []
    stop_other = threading.Event()

    def slow_store_call(ref: str) -> None:  # a store on a slow shared volume, say
        time.sleep(SLOW_CALL_S)
        tasks.report(ref, "writing_outputs")

    async def run_slowly(ref: str, params: dict) -> None:
        await asyncio.to_thread(slow_store_call, ref)  # as every store call of an attempt is made
        await asyncio.to_thread(tasks.complete, ref, {"ran": ref})

    async def run_taken_over(ref: str, params: dict) -> None:
        taken_over.append(ref)

    def other_replica() -> None:
        """Another replica (its own event loop, looking for stalled jobs every 2 s), started once the task runs on
        the slow one: only a takeover could give it the job."""
        wait_for(lambda: tasks.get("slow-task") is not None and tasks.get("slow-task").status == "processing", 60.0,
                 "running")

        async def watch() -> None:
            await other.start(run_taken_over)
            try:
                await asyncio.to_thread(stop_other.wait)
            finally:
                await other.close()
        asyncio.run(watch())

    watcher = threading.Thread(target=other_replica, name="other-replica")

    async def scenario() -> None:
        await asyncio.to_thread(tasks.create, "slow-task", None, "mri_segmentation")
        await slow.submit("slow-task", [], {})
        await slow.start(run_slowly)
        try:
            await asyncio.to_thread(wait_for, lambda: tasks.get("slow-task").status == "completed",
                                    SLOW_CALL_S * 4, "completed")
        finally:
            await slow.close()

    watcher.start()
    try:
        asyncio.run(scenario())
    finally:
        stop_other.set()
        watcher.join(timeout=60)
    assert taken_over == []
    with psycopg.connect(api_worker) as connection:
        assert connection.execute(f"SELECT attempt, owner FROM {TABLE} WHERE task_id = 'slow-task'").fetchone() == \
            (1, "slow")
