"""Dependency faults answered, not suffered (issue #23): the per-process breakers (state/dependency_health.py), and the
task store under them against a real PostgreSQL — refused at once while the database is down, progress skipped, one
result file per task however its attempts ended, orphans swept."""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psycopg
import pytest
from sqlalchemy import text

from api.limits import SharedWindows
from state.job_queue import JOB_TABLE, TASK_NAME, prepare_database
from state.dependency_health import DATABASE_UNREACHABLE, SHARED_VOLUME_UNAVAILABLE, Breaker, shared_volume
from core.errors import DependencyUnavailable
from state.pg_tasks import MAX_REQUEUES, ORPHAN_GRACE_S, QUEUEING_DEADLINE_S, TABLE, PostgresTaskStore
from state import shared_db
from state.shared_db import database_health
from state.request_cache import CachedRequest, RequestCache
from state.tasks import PACS_RUN_PREFIX, task_ref

WAIT_S = 30.0
"""The most a test waits for a probe thread to see a dependency back (it probes every `probe_every_s`)."""


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {WAIT_S} s"
        time.sleep(0.01)


def closed_port_url() -> str:
    """A PostgreSQL URL on a loopback port nothing listens on (connections are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"postgresql://nobody@127.0.0.1:{port}/none"


def test_a_tripped_breaker_refuses_at_once_and_closes_when_its_probe_succeeds() -> None:
    up = threading.Event()
    probes: list[bool] = []

    def probe() -> None:
        probes.append(up.is_set())
        if not up.is_set():
            raise ConnectionRefusedError("down")

    health = Breaker("the database", DATABASE_UNREACHABLE, probe, probe_every_s=0.01)
    health.check()  # closed: nothing raised, nothing probed
    assert health.available and probes == []
    error = health.tripped(ConnectionRefusedError("refused"))
    assert error.status == 503 and error.details["reason"] == DATABASE_UNREACHABLE
    with pytest.raises(DependencyUnavailable) as refused:
        health.check()
    assert refused.value.to_body()["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert not health.ready()
    wait_for(lambda: len(probes) >= 2, "probed in the background")
    assert health.tripped(ConnectionRefusedError("again")) is not None  # still one probing thread
    up.set()
    wait_for(lambda: health.available, "closed once the probe succeeded")
    assert probes[-1] is True
    health.check()


def test_readiness_probes_a_closed_breaker_and_opens_it_on_failure() -> None:
    calls: list[int] = []

    def probe() -> None:
        calls.append(1)
        raise OSError("volume gone")

    health = Breaker("the shared volume", SHARED_VOLUME_UNAVAILABLE, probe, probe_every_s=60.0)
    assert not health.ready() and not health.available and len(calls) == 1
    with pytest.raises(DependencyUnavailable, match="shared volume"):
        health.check()


def test_the_shared_volume_breaker_probes_by_writing(tmp_path: Path) -> None:
    assert shared_volume(tmp_path).ready()
    assert list(tmp_path.iterdir()) == []  # the probe file is removed
    missing = shared_volume(tmp_path / "not-mounted")
    assert not missing.ready()
    with pytest.raises(DependencyUnavailable) as refused:
        missing.check()
    assert refused.value.details["reason"] == SHARED_VOLUME_UNAVAILABLE


def test_the_store_refuses_every_call_at_once_once_a_connection_failed(postgres_server, tmp_path: Path,
                                                                       monkeypatch) -> None:
    store = PostgresTaskStore(postgres_server.new_database(), tmp_path / "volume")
    store.create("task_1", "req", "mri_segmentation")
    url = closed_port_url()
    store.database_url, store.database = url, database_health(url)  # the database stops answering
    connects: list[str] = []
    real_connect, test_thread = psycopg.connect, threading.current_thread()

    def counted(*args: object, **kwargs: object) -> psycopg.Connection:
        if threading.current_thread() is test_thread:  # not the breaker's own probe
            connects.append("try")
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(psycopg, "connect", counted)
    with pytest.raises(DependencyUnavailable) as first:
        store.get("task_1")
    assert first.value.details["reason"] == DATABASE_UNREACHABLE and connects == ["try"]
    for call in (lambda: store.get("task_1"), lambda: store.owner("task_1"), lambda: store.cancel("task_1"),
                 lambda: store.set_params("task_1", {}), lambda: store.begin_attempt("task_1", "r")):
        with pytest.raises(DependencyUnavailable):
            call()
    assert connects == ["try"], "calls after the first failure tried the database again"
    store.report(task_ref("task_1", 1), "inference", 50)  # progress is skipped, the run goes on
    assert not store.ready() and store.dependencies() == {"database": DATABASE_UNREACHABLE, "shared_volume": "ok"}


def test_the_rate_limiter_fails_open_without_waiting_while_the_database_is_down() -> None:
    url = closed_port_url()
    database_health(url).tripped(ConnectionRefusedError("down"))
    windows = SharedWindows(url)
    started = time.perf_counter()
    assert asyncio.run(windows.admit("client /route", 1)) is None
    print(f"rate limiter answered in {(time.perf_counter() - started) * 1000:.2f} ms with the breaker open")


@pytest.fixture
def store(postgres_server, tmp_path: Path) -> PostgresTaskStore:
    url = postgres_server.new_database()
    prepare_database(url)  # the queue's tables: the sweep looks for each task's job there
    return PostgresTaskStore(url, tmp_path / "volume")


def test_an_attempt_whose_commit_went_unanswered_leaves_one_file_after_the_next_commits(store, monkeypatch) -> None:
    store.create("task_1", "req", "mri_segmentation")
    store.set_params("task_1", {"uploads": []})
    first = task_ref("task_1", store.begin_attempt("task_1", "a"))

    def unanswered(*_: object, **__: object) -> bool:
        raise store.database.unavailable()

    with monkeypatch.context() as patched:
        patched.setattr(store, "_finish", unanswered)
        with pytest.raises(DependencyUnavailable):
            store.complete(first, {"answer": 1})
    assert [p.name for p in store.task_dir("task_1").glob("result-*.json")] == ["result-1.json"]  # outcome unknown
    second = task_ref("task_1", store.begin_attempt("task_1", "b"))  # the job's retry
    assert store.complete(second, {"answer": 2})
    assert [p.name for p in store.task_dir("task_1").glob("result-*.json")] == ["result-2.json"]
    assert store.get("task_1").result == {"answer": 2}


def insert_job(store: PostgresTaskStore, task_id: str, status: str) -> None:
    with psycopg.connect(store.database_url) as connection:
        connection.execute(f"INSERT INTO {JOB_TABLE} (queue_name, task_name, args, status) VALUES "
                           "('q', %s, %s, %s)", (TASK_NAME, psycopg.types.json.Jsonb({"task_id": task_id}), status))


def test_the_sweep_requeues_orphans_a_bounded_number_of_times_then_fails_them(store) -> None:
    for task_id in ("orphan", "queued", "held", "never_queued"):
        store.create(task_id, "req", "mri_segmentation")
    for task_id in ("orphan", "queued", "held"):
        store.set_params(task_id, {"uploads": []})
    insert_job(store, "queued", "todo")
    insert_job(store, "held", "doing")
    insert_job(store, "orphan", "failed")  # a job the queue gave up on does not hold the task
    store.begin_attempt("orphan", "a")  # processing, its job gone
    assert store.sweep(JOB_TABLE, TASK_NAME) == ([], [])  # within their grace: a defer may be on its way
    later = time.time() + ORPHAN_GRACE_S + 1
    for _ in range(MAX_REQUEUES):
        swept = store.sweep(JOB_TABLE, TASK_NAME, now=later)
        assert swept.requeue == ["orphan"] and swept.failed == []  # the never queued one is within its deadline
        record = store.get("orphan")
        assert (record.status, record.current_step) == ("pending", "queued")
    swept = store.sweep(JOB_TABLE, TASK_NAME, now=time.time() + QUEUEING_DEADLINE_S + 1)
    assert swept.requeue == [] and sorted(swept.failed) == ["never_queued", "orphan"]
    assert store.get("orphan").error["details"]["reason"] == "job_lost"
    assert store.get("never_queued").error["details"]["reason"] == "never_queued"
    assert {store.get(t).status for t in ("queued", "held")} == {"pending"}


def test_the_sweep_and_reads_leave_a_pacs_run_s_record_to_its_pacs_job(store) -> None:
    """A PACS job's run keeps a task record of its MRI work (no parameters, no queue job): however long it waits for
    the runner, it is the PACS job's (its lease, its later runs), not an orphan of the MRI queue."""
    waiting, running = f"{PACS_RUN_PREFIX}job1-a", f"{PACS_RUN_PREFIX}job2-b"
    for task_id in (waiting, running):
        store.create(task_id, task_id.split("-")[1], "mri_segmentation")
    store.report(running, "inference")
    swept = store.sweep(JOB_TABLE, TASK_NAME, now=time.time() + QUEUEING_DEADLINE_S + 1)
    assert swept == ([], [])
    assert {store.get(waiting).status, store.get(running).status} == {"pending", "processing"}
    assert store.active_of_request("job1") == [waiting]


def test_one_sweep_at_a_time_across_replicas(store) -> None:
    store.create("orphan", "req", "mri_segmentation")
    store.set_params("orphan", {"uploads": []})
    with psycopg.connect(store.database_url) as other, other.transaction():
        other.execute("SELECT pg_advisory_xact_lock(%s)", (0x4E4E_5357,))  # another replica sweeps now
        assert store.sweep(JOB_TABLE, TASK_NAME, now=time.time() + ORPHAN_GRACE_S + 1).requeue == []
    assert store.sweep(JOB_TABLE, TASK_NAME, now=time.time() + ORPHAN_GRACE_S + 1).requeue == ["orphan"]
    with psycopg.connect(store.database_url) as connection:
        assert connection.execute(f"SELECT requeued FROM {TABLE} WHERE task_id = 'orphan'").fetchone() == (1,)


def test_breakers_are_one_per_dependency_and_process(tmp_path: Path) -> None:
    url = closed_port_url()
    assert database_health(url) is database_health(url.replace("postgresql://", "postgresql+psycopg://"))
    assert shared_volume(tmp_path) is shared_volume(str(tmp_path))


def test_a_pooled_connection_ended_by_a_restart_does_not_trip_the_breaker(postgres_server) -> None:
    url = postgres_server.new_database()
    made = shared_db.engine(url)
    with made.connect() as connection:
        pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
    with psycopg.connect(url, autocommit=True) as admin:  # as a restart of PostgreSQL ends every session
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with shared_db.engine(url).connect() as connection:  # the pool's ping finds it dead and connects anew
        assert connection.execute(text("SELECT 1")).scalar_one() == 1
    assert database_health(url).available



def test_the_shared_request_cache_answers_503_while_the_volume_fails_and_serves_once_it_is_back(tmp_path: Path) -> None:
    folder = tmp_path / "request_cache"

    def probe() -> None:  # as `shared_volume`'s probe: a file can be written there again
        (folder / ".probe").write_bytes(b"probe")

    volume = Breaker("the shared volume", SHARED_VOLUME_UNAVAILABLE, probe, probe_every_s=0.05)
    cache = RequestCache(folder, max_entries=4, ttl_seconds=60, max_bytes=2**20, volume=volume)
    entry = CachedRequest("req-1", "ct_classification", "v1", "0" * 64, {"input": np.zeros(3, np.float32)}, {})
    cache.put(entry)
    shutil.rmtree(folder)
    folder.write_bytes(b"")  # the mount point turned into something no file can be written under
    with pytest.raises(DependencyUnavailable) as refused:
        cache.put(entry)
    assert refused.value.details["reason"] == SHARED_VOLUME_UNAVAILABLE
    with pytest.raises(DependencyUnavailable):  # open: refused at once (or by the failing read: the same answer)
        cache.get("req-1")
    folder.unlink()
    folder.mkdir()
    deadline = time.monotonic() + 30
    while not volume.available:  # the prober closes the breaker at its first successful probe
        assert time.monotonic() < deadline, "the volume's breaker did not close"
        time.sleep(0.05)
    cache.put(entry)
    assert cache.get("req-1").request_id == "req-1"


def test_an_answer_stands_when_its_cache_entry_cannot_be_kept(tmp_path: Path) -> None:
    folder = tmp_path / "request_cache"
    volume = Breaker("the shared volume", SHARED_VOLUME_UNAVAILABLE, lambda: None, probe_every_s=3600)
    cache = RequestCache(folder, max_entries=4, ttl_seconds=60, max_bytes=2**20, volume=volume)
    entry = CachedRequest("req-2", "ct_classification", "v1", "0" * 64, {"input": np.zeros(3, np.float32)}, {})
    shutil.rmtree(folder)
    folder.write_bytes(b"")
    assert cache.remember(entry) is False  # the caller answers 200 with a warning instead of failing
    assert not volume.available
