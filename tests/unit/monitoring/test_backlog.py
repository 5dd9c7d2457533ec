"""The MRI task backlog gauges, from both task stores (SQLite, and a real PostgreSQL: tests/postgres.py); a store
that cannot be read leaves them as they were and the watch goes on."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from state.pg_tasks import PostgresTaskStore
from state.tasks import Backlog, TaskStates, TaskStore
from monitoring.backlog import publish_backlog, watch_backlog
from monitoring.live import replica_samples


def gauges() -> dict[str, float]:
    return {(s.labels.get("status") or s.name): s.value for s in replica_samples()
            if s.name in ("neuronova_tasks", "neuronova_task_oldest_unfinished_age_seconds")}


def fill(store: TaskStates) -> float:
    """Three tasks: one pending, one processing, one completed; the creation time of the oldest unfinished one."""
    for task_id in ("task_a", "task_b", "task_c"):
        store.create(task_id, None, "mri_segmentation")
    store.report("task_b", "inference")
    store.complete("task_c", {"done": True})
    return store.get("task_a").created_at


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> TaskStates:
    if request.param == "sqlite":
        return TaskStore(tmp_path / "tasks.db")
    return PostgresTaskStore(request.getfixturevalue("postgres_server").new_database(), tmp_path / "volume")


def test_the_gauges_show_the_unfinished_tasks_and_the_oldest_age(store: TaskStates) -> None:
    assert store.backlog() == Backlog(counts={"pending": 0, "processing": 0}, oldest_created_at=None)
    publish_backlog(store)
    assert gauges()["neuronova_task_oldest_unfinished_age_seconds"] == 0
    oldest = fill(store)
    publish_backlog(store, now=oldest + 90)
    assert gauges() == {"pending": 1, "processing": 1, "neuronova_task_oldest_unfinished_age_seconds": 90}


class Unreadable:
    """A task store whose database is down for its first `outages` reads."""

    def __init__(self, store: TaskStates, outages: int) -> None:
        self.store, self.outages, self.reads = store, outages, 0

    def backlog(self) -> Backlog:
        self.reads += 1
        if self.reads <= self.outages:
            raise ConnectionError("database unreachable")
        return self.store.backlog()


def test_an_unreadable_store_is_logged_once_and_watched_until_it_answers(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    sqlite = TaskStore(tmp_path / "tasks.db")
    fill(sqlite)
    store = Unreadable(sqlite, outages=3)

    async def watch_until_read() -> None:
        watch = asyncio.create_task(watch_backlog(store, interval=0.001))  # type: ignore[arg-type]
        while store.reads <= store.outages + 1:  # a second good read began: the first one was published
            await asyncio.sleep(0.001)
        watch.cancel()

    with caplog.at_level(logging.INFO, logger="neuronova.monitoring"):
        asyncio.run(watch_until_read())
    assert [r.getMessage() for r in caplog.records] == ["task backlog unreadable: ConnectionError",
                                                        "task backlog readable again"]
    assert gauges()["pending"] == 1
