"""Distributed mode: which failures of a queued MRI attempt hand the task back to the queue instead of failing it
(a runner not serving, a shutdown, the database lost anywhere in the attempt), and the queue worker restarted after
the database was lost."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from http import HTTPStatus
from types import SimpleNamespace

import psycopg
import pytest
from bentoml.exceptions import BentoMLException
from procrastinate.exceptions import ConnectorException

from state import job_queue as task_queue
from state.job_queue import MAX_RUNS, HandedBack, MriQueue, runner_not_serving
from state.dependency_health import DATABASE_UNREACHABLE, Breaker, file_io_on
from core.errors import DependencyUnavailable, InvalidRequest, ModelInferenceError, ModelNotLoaded


def queue() -> MriQueue:
    """A queue object as an API worker builds it (procrastinate connects only when opened)."""
    return MriQueue(store=None, database_url="postgresql://nobody@127.0.0.1:9/none", replica="r",  # type: ignore[arg-type]
                    shutdown_grace_s=15.0)


def failing(error: Exception):
    async def work() -> None:
        raise error
    return work


def answered_503() -> ModelInferenceError:
    try:
        raise BentoMLException("Error making request: 503", error_code=HTTPStatus.SERVICE_UNAVAILABLE)
    except BentoMLException as cause:
        try:
            raise ModelInferenceError("mri_segmentation runner failed", {"reason": "BentoMLException"}) from cause
        except ModelInferenceError as error:
            return error


def test_a_runner_not_serving_yet_is_told_from_a_failed_inference() -> None:
    assert runner_not_serving(ModelNotLoaded("mri_segmentation runner is unreachable"))
    assert runner_not_serving(answered_503())
    assert not runner_not_serving(ModelInferenceError("mri_segmentation runner failed"))
    assert not runner_not_serving(InvalidRequest("no FLAIR"))


@pytest.mark.parametrize("error", [ModelNotLoaded("unreachable"), answered_503()])
def test_an_attempt_whose_runner_is_not_serving_is_handed_back_until_the_last_run(error: Exception) -> None:
    with pytest.raises(HandedBack):
        asyncio.run(queue().guarded(failing(error), "task@1")())
    with pytest.raises(type(error)):  # the last run allowed fails the task instead of leaving it pending for ever
        asyncio.run(queue().guarded(failing(error), f"task@{MAX_RUNS}")())


def test_a_bad_input_fails_the_attempt_and_a_stopping_worker_hands_any_failure_back() -> None:
    with pytest.raises(InvalidRequest):
        asyncio.run(queue().guarded(failing(InvalidRequest("no FLAIR")), "task@1")())
    stopping = queue()
    stopping.stopping = True
    with pytest.raises(HandedBack):
        asyncio.run(stopping.guarded(failing(InvalidRequest("runner gone mid-shutdown")), "task@1")())


class FlakyStore:
    """A task store whose database goes away at a chosen call (names in `down_at`), with the breaker of a real one."""

    def __init__(self, *down_at: str) -> None:
        self.down_at = set(down_at)
        self.database = Breaker("the database", DATABASE_UNREACHABLE, lambda: None, probe_every_s=0.01)
        self.calls: list[str] = []

    def _call(self, name: str, value: object) -> object:
        self.calls.append(name)
        if name in self.down_at:
            raise self.database.tripped(psycopg.OperationalError("server closed the connection unexpectedly"))
        return value

    def begin_attempt(self, task_id: str, owner: str) -> int | None:
        return self._call("begin_attempt", 1)

    def params(self, task_id: str) -> dict:
        return self._call("params", {"uploads": []})

    def hand_back(self, ref: str) -> bool:
        return self._call("hand_back", True)


def run_job(store: FlakyStore, run) -> None:
    q = MriQueue(store=store, database_url="postgresql://nobody@127.0.0.1:9/none", replica="r",  # type: ignore[arg-type]
                 shutdown_grace_s=15.0)
    q._run = run
    asyncio.run(q._run_job("task_1"))


async def completes(ref: str, params: dict) -> None:
    return None


def unreachable_at_commit() -> Callable:
    async def run(ref: str, params: dict) -> None:
        raise DependencyUnavailable("the database is unreachable", {"reason": DATABASE_UNREACHABLE})
    return run


@pytest.mark.parametrize("error", [DependencyUnavailable("down", {"reason": DATABASE_UNREACHABLE}),
                                   psycopg.OperationalError("connection refused")])
def test_a_transient_database_error_inside_an_attempt_hands_it_back(error: Exception) -> None:
    with pytest.raises(HandedBack):
        asyncio.run(queue().guarded(failing(error), "task@1")())


@pytest.mark.parametrize("down_at", ["begin_attempt", "params"])
def test_a_database_lost_before_the_run_hands_the_job_back(down_at: str) -> None:
    store = FlakyStore(down_at)
    with pytest.raises(HandedBack):
        run_job(store, completes)
    assert store.calls[-1] == ("begin_attempt" if down_at == "begin_attempt" else "hand_back")


def test_a_database_lost_at_commit_hands_back_even_when_the_hand_back_cannot_be_written() -> None:
    store = FlakyStore("hand_back")
    with pytest.raises(HandedBack):
        run_job(store, unreachable_at_commit())
    assert store.calls == ["begin_attempt", "params", "hand_back"]  # the row stays processing: the retry begins anew


def test_a_real_failure_of_the_run_is_not_handed_back() -> None:
    async def broken(ref: str, params: dict) -> None:
        raise ValueError("a bug")

    store = FlakyStore()
    with pytest.raises(ValueError):
        run_job(store, broken)
    assert "hand_back" not in store.calls
    run_job(store, completes)


@pytest.mark.parametrize("database_down", [True, False])
def test_the_queue_worker_stopped_by_a_lost_connection_is_started_again_once_the_database_answers(
        monkeypatch, database_down: bool) -> None:
    """A worker stopped by a connection error: the database is probed; only a database that does not answer trips
    the breaker (every caller then gets 503 until it is back); a connection a restart closed does not."""
    probes: list[bool] = []

    def probe() -> None:
        probes.append(database_down and len(probes) < 3)
        if probes[-1]:
            raise psycopg.OperationalError("connection refused")

    store = FlakyStore()
    store.database = Breaker("the database", DATABASE_UNREACHABLE, probe, probe_every_s=0.01)
    q = MriQueue(store=store, database_url="postgresql://nobody@127.0.0.1:9/none", replica="r",  # type: ignore[arg-type]
                 shutdown_grace_s=15.0)
    runs: list[bool] = []

    async def worker(**_: object) -> None:
        runs.append(store.database.available)
        if len(runs) == 1:
            try:
                raise psycopg.OperationalError("terminating connection due to administrator command")
            except psycopg.OperationalError as cause:
                raise ConnectorException("fetch failed") from cause
        if len(runs) == 3:
            q.stopping = True  # `stop`: the worker returns, and is not started again
        # runs 2 and 3 return as procrastinate's worker does when its heartbeat task failed

    monkeypatch.setattr(q.app, "run_worker_async", worker)
    monkeypatch.setattr(task_queue, "WORKER_RESTART_S", 0.01)
    asyncio.run(q._supervise())
    assert runs == [True, True, True]  # never started while the breaker was open
    assert probes[0] is database_down  # the database itself was asked
    assert (len(probes) > 1) is database_down  # down: tripped, probed until back; up: nothing tripped


class RegisteringStore(FlakyStore):
    """The database away for the first `down_for` registrations of a submitted task."""

    def __init__(self, down_for: int) -> None:
        super().__init__()
        self.down_for = down_for

    def create(self, task_id: str, request_id: str, model_id: str) -> None:
        self.down_at = {"create"} if len(self.calls) < self.down_for else set()
        self._call("create", None)


def test_an_answered_submission_is_queued_once_the_database_is_back(monkeypatch) -> None:
    store = RegisteringStore(down_for=3)
    q = MriQueue(store=store, database_url="postgresql://nobody@127.0.0.1:9/none", replica="r",  # type: ignore[arg-type]
                 shutdown_grace_s=15.0)
    queued: list[str] = []

    async def submit(task_id: str, uploads: list, params: dict, priority: str) -> None:
        queued.append(task_id)

    monkeypatch.setattr(q, "submit", submit)
    monkeypatch.setattr(task_queue, "WORKER_RESTART_S", 0.01)
    asyncio.run(q.accept("task_1", "req", "mri_segmentation", [], {}))
    assert store.calls == ["create"] * 4 and queued == ["task_1"]
    store.calls.clear()
    store.down_for = 10
    monkeypatch.setattr(task_queue, "ACCEPT_PATIENCE_S", 0.0)  # an outage longer than the patience: the error stands
    with pytest.raises(DependencyUnavailable):
        asyncio.run(q.accept("task_2", "req", "mri_segmentation", [], {}))
    assert queued == ["task_1"]


def test_an_upload_unreadable_for_a_volume_outage_hands_the_attempt_back(tmp_path) -> None:
    volume = Breaker("the shared volume", "shared_volume_unavailable", lambda: None, probe_every_s=3600)
    q = queue()
    q.store = SimpleNamespace(on_volume=lambda: file_io_on(volume))  # type: ignore[assignment]
    upload = tmp_path / "uploads" / "0" / "case.nii.gz"  # its folder is a file: the volume's I/O error
    upload.parent.parent.mkdir()
    upload.parent.write_bytes(b"")
    with pytest.raises(DependencyUnavailable):
        q.read_upload(upload)
    with pytest.raises(HandedBack):  # the attempt reading it is handed back, not failed
        asyncio.run(q.guarded(lambda: asyncio.to_thread(q.read_upload, upload), "task_1@1")())
    healthy = Breaker("the shared volume", "shared_volume_unavailable", lambda: None, probe_every_s=3600)
    q.store = SimpleNamespace(on_volume=lambda: file_io_on(healthy))  # type: ignore[assignment]
    with pytest.raises(FileNotFoundError):  # a missing upload (the volume answering) is the task's own error
        q.read_upload(tmp_path / "missing.nii.gz")
    assert healthy.available
