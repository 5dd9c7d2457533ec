"""The PACS job store on a real PostgreSQL (state/pacs_jobs_pg.py; tests/postgres.py), as two replicas see it: two
store objects with their own replica names on one database. Each study once, a job claimed by one worker at a time,
an expired lease taken over as a new run (a job interrupted twice fails), a superseded run's writes refused, the
replica's own jobs recovered at its restart, notifications and the poller's lock shared."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest

from core.settings import Settings
from state.pacs_jobs import MAX_RUNS, JobStore, Lease
from state.stores import open_job_store
from state.pacs_jobs_pg import JOBS, PostgresJobStore

STUDY = "1.2.3.4"
SERIES = {"T1": "1.2.3.4.1", "T2": "1.2.3.4.2"}


@pytest.fixture
def database(postgres_server) -> str:
    return postgres_server.new_database()


@pytest.fixture
def replicas(database: str, tmp_path: Path) -> tuple[PostgresJobStore, PostgresJobStore]:
    """Replicas a and b on one database and one shared volume."""
    return (PostgresJobStore(database, tmp_path / "volume", "a"), PostgresJobStore(database, tmp_path / "volume", "b"))


def expire(store: PostgresJobStore, job_id: str) -> None:
    """The job's lease runs out (its holder stopped renewing it)."""
    with psycopg.connect(store.database_url) as connection:
        connection.execute(f"UPDATE {JOBS} SET lease_expires = 0 WHERE job_id = %s", (job_id,))


def wait_for(check: Callable[[], object], timeout_s: float = 30.0) -> object:
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return found


def test_the_factory_picks_the_backend_from_the_settings(database: str, tmp_path: Path) -> None:
    embedded = open_job_store(Settings(data_dir=str(tmp_path / "data")))
    assert isinstance(embedded, JobStore) and embedded.results_dir == tmp_path / "data" / "pacs" / "results"
    shared = open_job_store(Settings(distributed={"database_url": database, "shared_dir": str(tmp_path / "volume"),
                                                  "replica_id": "a"}))
    assert isinstance(shared, PostgresJobStore) and shared.results_dir == tmp_path / "volume" / "pacs" / "results"
    assert shared.owner.startswith("a/")
    with pytest.raises(ValueError, match="SHARED_DIR"):
        open_job_store(Settings(distributed={"database_url": database}))


def test_a_study_resolved_on_two_replicas_at_once_is_one_job(replicas) -> None:
    start = threading.Barrier(8)

    def add(store: PostgresJobStore) -> tuple[str, bool]:
        start.wait()
        return store.add(STUDY, "mri_segmentation", "m:1", SERIES)

    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(add, [replicas[i % 2] for i in range(8)]))
    assert len({job_id for job_id, _ in made}) == 1 and [new for _, new in made].count(True) == 1
    (job,) = replicas[1].list(STUDY)
    assert job.state == "queued" and job.series == SERIES and job.log[0]["message"].startswith("queued (routine): ")
    stamped = datetime.fromisoformat(job.log[0]["at"])  # on the database's clock, as the SQLite store writes times
    assert stamped.utcoffset() == timedelta(0) and abs(stamped - datetime.fromisoformat(job.created_at)).total_seconds() < 5
    other, new = replicas[0].add(STUDY, "mri_segmentation", "m:2", SERIES)
    assert new and other != job.job_id
    skipped, _ = replicas[0].add(STUDY, None, None, {}, state="skipped", reason="no rule matched: x")
    assert replicas[1].add(STUDY, None, None, {}, state="skipped", reason="no rule matched: x") == (skipped, False)
    assert replicas[0].get(skipped).state == "skipped" and len(replicas[1].list(STUDY)) == 3


def test_concurrent_claims_take_each_job_exactly_once(replicas) -> None:
    ids = [replicas[0].add(f"1.2.3.{n}", "ct_classification", "c:1", {"slice": f"1.2.3.{n}.1"})[0] for n in range(20)]
    claimed: list[Lease] = []
    lock = threading.Lock()

    def work(store: PostgresJobStore) -> None:
        while (lease := store.claim()) is not None:
            with lock:
                claimed.append(lease)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(work, [replicas[i % 2] for i in range(6)]))
    assert sorted(lease.job_id for lease in claimed) == sorted(ids)
    assert all(lease.attempt == 1 and lease.job.state == "running" and lease.job.runs == 1 for lease in claimed)


def test_claims_take_urgent_jobs_first_then_the_oldest(replicas) -> None:
    a, _ = replicas
    first, _ = a.add("1.2.3.1", "ct_classification", "c:1", {"slice": "1.2.3.1.1"})
    second, _ = a.add("1.2.3.2", "ct_classification", "c:1", {"slice": "1.2.3.2.1"})
    urgent, _ = a.add("1.2.3.3", "ct_classification", "c:1", {"slice": "1.2.3.3.1"})
    with psycopg.connect(a.database_url) as connection:
        connection.execute(f"UPDATE {JOBS} SET priority = 1 WHERE job_id = %s", (urgent,))
    assert [a.claim().job_id for _ in range(3)] == [urgent, first, second]  # type: ignore[union-attr]


def test_a_lease_is_renewed_while_the_job_runs_and_taken_over_once_it_expires(database: str, tmp_path: Path) -> None:
    a = PostgresJobStore(database, tmp_path / "volume", "a", lease_s=1.0)
    b = PostgresJobStore(database, tmp_path / "volume", "b", lease_s=1.0)
    job_id, _ = a.add(STUDY, "mri_segmentation", "m:1", SERIES)
    lease = a.claim()
    assert lease is not None

    def expiry() -> float:
        with psycopg.connect(database) as connection:
            return connection.execute(f"SELECT lease_expires FROM {JOBS} WHERE job_id = %s", (job_id,)).fetchone()[0]

    first = expiry()
    with a.keep_alive(lease):
        wait_for(lambda: expiry() > first + 1.0)  # renewed past its first lease, and again
        assert b.claim() is None  # held: not claimable
    wait_for(b.claim)  # the lease ran out: b takes the job over
    job = b.get(job_id)
    assert job.state == "running" and job.runs == 2 and job.log[-1]["message"].startswith(f"the lease of {a.owner}")
    assert not a.renew(lease)  # superseded: no renewal either


def test_a_superseded_run_changes_nothing(replicas) -> None:
    a, b = replicas
    job_id, _ = a.add(STUDY, "mri_segmentation", "m:1", SERIES)
    old = a.claim()
    expire(a, job_id)
    new = b.claim()
    assert old is not None and new is not None and (old.attempt, new.attempt) == (1, 2)
    before = b.get(job_id)
    for write in (lambda: a.log(old, "late"), lambda: a.ready_to_export(old, "late"), lambda: a.renew(old),
                  lambda: a.export_failed(old, "late", 0.0), lambda: a.retry_later(old, "late", 0.0),
                  lambda: a.done(old, [{"modality": "SEG"}], "late"), lambda: a.fail(old, "late")):
        assert write() is False
    assert b.get(job_id) == before
    assert b.ready_to_export(new, "built") and b.done(new, [{"modality": "SEG"}], "stored")
    job = b.get(job_id)
    assert job.state == "done" and job.results == [{"modality": "SEG"}] and job.runs == 2
    assert not b.done(new, [], "again")  # a finished job takes no more writes


def test_a_job_interrupted_twice_fails_and_an_exporting_one_is_sent_again_without_a_run(replicas) -> None:
    a, b = replicas
    job_id, _ = a.add(STUDY, "mri_segmentation", "m:1", SERIES)
    for run in range(1, MAX_RUNS + 1):
        lease = (a, b)[run % 2].claim()
        assert lease is not None and lease.job.runs == run
        expire(a, job_id)
    assert a.claim() is None
    job = a.get(job_id)
    assert job.state == "failed" and job.reason == "interrupted twice"
    exporting, _ = a.add("1.2.3.5", "ct_classification", "c:1", {"slice": "1.2.3.5.1"})
    lease = a.claim()
    assert lease is not None and a.ready_to_export(lease, "built")
    expire(a, exporting)
    again = b.claim()
    assert again is not None and again.job.state == "exporting" and again.job.runs == 1


def test_exports_and_retries_wait_their_backoff_on_any_replica(replicas) -> None:
    a, b = replicas
    job_id, _ = a.add(STUDY, "ct_classification", "c:1", {"slice": "1.2.3.4.9"})
    lease = a.claim()
    assert lease is not None and a.retry_later(lease, "retrieve failed", 0.0)
    assert a.get(job_id).state == "queued" and a.get(job_id).runs == 0
    lease = b.claim()
    assert lease is not None and b.ready_to_export(lease, "built")
    assert b.export_failed(lease, "export failed: ConnectionError", 60.0)
    job = a.get(job_id)
    assert job.state == "exporting" and job.export_failures == 1 and "next attempt in 60.0 s" in job.log[-1]["message"]
    assert a.claim() is None  # not due yet
    assert a.list(state="exporting") == [job] and a.list("9.9") == []


def test_a_restarted_replica_frees_its_own_jobs_and_leaves_the_others(database: str, tmp_path: Path, replicas) -> None:
    a, b = replicas
    mine, _ = a.add("1.2.3.1", "ct_classification", "c:1", {"slice": "1.2.3.1.1"})
    theirs, _ = a.add("1.2.3.2", "ct_classification", "c:1", {"slice": "1.2.3.2.1"})
    exporting, _ = a.add("1.2.3.3", "ct_classification", "c:1", {"slice": "1.2.3.3.1"})
    assert a.claim().job_id == mine and b.claim().job_id == theirs  # type: ignore[union-attr]
    lease = a.claim()
    assert lease is not None and lease.job_id == exporting and a.ready_to_export(lease, "built")
    restarted = PostgresJobStore(database, tmp_path / "volume", "a")
    assert restarted.recover() == [mine]
    assert a.get(mine).state == "queued" and a.get(mine).log[-1]["message"].startswith("interrupted by a restart")
    assert a.get(theirs).state == "running"
    assert {b.claim().job_id, b.claim().job_id} == {mine, exporting}  # type: ignore[union-attr]
    assert PostgresJobStore(database, tmp_path / "volume", None).recover() == []  # no replica id: nothing is ours


def test_notifications_are_shared_deduplicated_leased_and_retried(replicas) -> None:
    a, b = replicas
    a.notice(STUDY)
    b.notice(STUDY)
    claimed = a.claim_notice()
    assert claimed is not None and claimed[0] == STUDY
    assert b.claim_notice() is None  # leased by a
    assert a.notice_failed(STUDY, 0.0) == 1 and b.notice_failures(STUDY) == 1
    study, received = b.claim_notice()  # type: ignore[misc]
    a.notice(STUDY)  # notified again while b handles it
    b.notice_handled(study, received)
    renewed = a.claim_notice()
    assert renewed is not None and renewed[1] != received
    a.notice_handled(*renewed)
    assert b.claim_notice() is None and a.notice_failures(STUDY) == 0


def test_the_cursor_and_the_poller_lock_are_shared(replicas) -> None:
    a, b = replicas
    assert b.cursor("orthanc_changes") is None
    a.set_cursor("orthanc_changes", 41)
    a.set_cursor("orthanc_changes", 42)
    assert b.cursor("orthanc_changes") == 42
    lock = a.poller_lock()
    assert lock is not None and lock.held() and b.poller_lock() is None
    lock.close()
    taken = wait_for(b.poller_lock)
    with psycopg.connect(b.database_url, autocommit=True) as admin:  # the holder's connection lost
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted")
    assert not taken.held()  # type: ignore[union-attr]
    taken.close()  # type: ignore[union-attr]
    again = wait_for(a.poller_lock)
    again.close()  # type: ignore[union-attr]


def test_one_worker_of_all_replicas_polls_changes_and_another_takes_over_when_it_is_gone(
        replicas, monkeypatch: pytest.MonkeyPatch) -> None:
    """`Background.poll_while_leader` on two replicas: one polls while the other keeps asking for the lock; a leader
    whose lock connection is lost stops polling (and a worker takes the lock again); when the leader's worker is gone
    the other replica's worker polls."""
    from pacs import runtime

    monkeypatch.setattr(runtime, "LEADER_RETRY_S", 0.02)
    polling: list[str] = []
    stopped: list[str] = []
    asked = {store.replica: 0 for store in replicas}

    class Flow:
        def __init__(self, store: PostgresJobStore) -> None:
            self.jobs = SimpleNamespace(poller_lock=self.poller_lock)  # counts the asks
            self.store = store
            self.config = SimpleNamespace(changes=SimpleNamespace(url="http://orthanc", interval_seconds=0.5))

        def poller_lock(self):
            asked[self.store.replica] += 1
            return self.store.poller_lock()

        async def poll_changes(self) -> None:
            polling.append(self.store.replica)  # type: ignore[arg-type]
            try:
                await asyncio.Event().wait()
            finally:
                polling.remove(self.store.replica)  # type: ignore[arg-type]
                stopped.append(self.store.replica)  # type: ignore[arg-type]

    async def until(condition: Callable[[], bool]) -> None:
        while not condition():
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        workers = {store.replica: asyncio.create_task(runtime.Background(Flow(store), "-").poll_while_leader())  # type: ignore[arg-type]
                   for store in replicas}
        try:
            await until(lambda: len(polling) == 1)
            leader = polling[0]
            other = next(name for name in workers if name != leader)
            asked_before = asked[other]
            await until(lambda: asked[other] >= asked_before + 3)  # the other asked again and again meanwhile
            assert polling == [leader]
            with psycopg.connect(replicas[0].database_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted")
            await until(lambda: stopped == [leader] and len(polling) == 1)  # noticed, stopped, and one polls again
            current = polling[0]
            workers[current].cancel()  # its replica gone
            await until(lambda: polling == [next(name for name in workers if name != current)])
        finally:
            for worker in workers.values():
                worker.cancel()
            await asyncio.gather(*workers.values(), return_exceptions=True)

    asyncio.run(asyncio.wait_for(scenario(), 60))
    assert polling == []


def test_an_urgent_job_is_claimed_before_routine_ones_on_any_replica(replicas) -> None:
    first, second = replicas
    routine = [first.add(f"1.2.3.{index}", "mri_segmentation", "m:1", {"T1": f"1.2.3.{index}.1"})[0] for index in range(10)]
    urgent, _ = second.add("1.2.3.99", "mri_segmentation", "m:1", {"T1": "1.2.3.99.1"}, priority="urgent")
    claimed = first.claim()
    assert claimed is not None and claimed.job_id == urgent and claimed.job.priority == "urgent"
    assert [second.claim().job_id for _ in routine] == routine  # then first in, first out
