"""Distributed mode: an urgent MRI task's job is taken before every routine job waiting, against a real PostgreSQL
(tests/postgres.py) and procrastinate's own fetch, and keeps its priority when handed back or taken over."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from procrastinate.jobs import Job

from state.job_queue import QUEUE, HandedBack, MriQueue, prepare_database
from state.pg_tasks import PostgresTaskStore
from core.priority import RANK, Priority


@pytest.fixture
def queue(postgres_server, tmp_path: Path) -> MriQueue:
    url = postgres_server.new_database()
    prepare_database(url)
    return MriQueue(PostgresTaskStore(url, tmp_path / "volume"), url, replica="r", shutdown_grace_s=15.0)


async def submit(queue: MriQueue, upload: Path, task_id: str, priority: Priority) -> None:
    await asyncio.to_thread(queue.store.create, task_id, f"req-{task_id}", "mri_segmentation")
    await queue.submit(task_id, [upload], {"request_id": f"req-{task_id}"}, priority)


def test_an_urgent_job_is_fetched_before_ten_routine_ones_and_keeps_its_priority(queue: MriQueue,
                                                                                  tmp_path: Path) -> None:
    upload = tmp_path / "case.nii.gz"
    upload.write_bytes(b"volume")

    async def scenario() -> list[Job]:
        try:
            for index in range(10):
                await submit(queue, upload, f"routine-{index}", "routine")
            await submit(queue, upload, "urgent", "urgent")
            manager = queue.app.job_manager
            worker = await manager.register_worker()  # no worker runs: jobs are fetched as one would

            async def next_job() -> Job:
                job = await manager.fetch_job(queues=[QUEUE], worker_id=worker)
                assert job is not None
                return job

            first = await next_job()
            decision = queue.job.retry_strategy.get_retry_decision(exception=HandedBack("shutdown"), job=first)
            assert decision is not None  # handed back: retried as the worker does it, priority as the decision says
            await manager.retry_job(first, priority=decision.priority)
            again = await next_job()
            await manager.retry_job(again)  # taken over from a silent worker (`_requeue_stalled`)
            return [await next_job() for _ in range(11)]
        finally:
            await queue.close()

    fetched = asyncio.run(scenario())
    assert [job.task_kwargs["task_id"] for job in fetched] == ["urgent"] + [f"routine-{i}" for i in range(10)]
    assert [job.priority for job in fetched] == [RANK["urgent"]] + [RANK["routine"]] * 10
