"""The PostgreSQL task store against a real PostgreSQL (tests/postgres.py): the polling body's state, attempts as
fencing tokens (a superseded run writes nothing), hand-back, cancel from anywhere, results as write-once files."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from core.errors import error_body
from state.pg_tasks import QUEUEING_DEADLINE_S, TABLE, PostgresTaskStore
from core.settings import Settings
from state.tasks import TaskCancelled, TaskStore, TaskSuperseded, split_ref, task_ref
from state.stores import open_task_store


@pytest.fixture
def store(postgres_server, tmp_path: Path) -> PostgresTaskStore:
    return PostgresTaskStore(postgres_server.new_database(), tmp_path / "volume")


def started(store: PostgresTaskStore, task_id: str = "task_1") -> str:
    store.create(task_id, "req-1", "mri_segmentation")
    store.set_params(task_id, {"uploads": []})
    attempt = store.begin_attempt(task_id, "replica-a")
    assert attempt is not None
    return task_ref(task_id, attempt)


def test_references_carry_the_attempt() -> None:
    assert split_ref(task_ref("task_abc", 3)) == ("task_abc", 3)
    assert split_ref("task_abc") == ("task_abc", None) and task_ref("task_abc", None) == "task_abc"
    assert split_ref("a@b") == ("a@b", None)


def test_the_factory_picks_the_store_from_the_settings(postgres_server, tmp_path: Path) -> None:
    embedded = open_task_store(Settings(data_dir=str(tmp_path / "data")))
    assert isinstance(embedded, TaskStore) and embedded.path.is_relative_to(tmp_path / "data")
    url = postgres_server.new_database()
    shared = open_task_store(Settings(distributed={"database_url": url, "shared_dir": str(tmp_path / "volume")}))
    assert isinstance(shared, PostgresTaskStore) and shared.database_url == url
    with pytest.raises(ValueError, match="SHARED_DIR"):
        open_task_store(Settings(distributed={"database_url": url}))


def test_a_run_reports_progress_and_commits_one_result(store: PostgresTaskStore) -> None:
    ref = started(store)
    assert store.get("task_1").status == "processing" and store.get("task_1").attempt == 1
    store.report(ref, "inference", 40, 3.0)
    store.report(ref, "inference", 30)  # progress never goes back
    record = store.get("task_1")
    assert (record.current_step, record.progress, record.estimated_remaining_seconds) == ("inference", 40, None)
    assert store.complete(ref, {"mask": "x" * 1000})
    record = store.get("task_1")
    assert record.status == "completed" and record.progress == 100 and record.result == {"mask": "x" * 1000}
    assert record.to_json()["completed_at"] is not None
    assert [p.name for p in store.task_dir("task_1").iterdir()] == ["result-1.json"]
    assert store.begin_attempt("task_1", "replica-b") is None  # nothing left to run


def test_a_superseded_attempt_can_never_overwrite_the_takeover(store: PostgresTaskStore) -> None:
    old = started(store)
    store.report(old, "inference", 50)
    new = task_ref("task_1", store.begin_attempt("task_1", "replica-b"))  # replica-a stopped answering: takeover
    assert split_ref(new)[1] == 2
    with pytest.raises(TaskSuperseded):
        store.report(old, "inference", 80)  # the old run resumes: told to stop at its next check
    assert store.cancel_requested(old) and not store.cancel_requested(new)
    assert store.get("task_1").progress == 50
    store.report(new, "inference", 60)
    assert store.complete(new, {"answer": "new"})
    assert not store.complete(old, {"answer": "old"})  # late result of the paused run: refused, file removed
    assert not store.fail(old, error_body("INTERNAL_SERVER_ERROR", "late"))
    record = store.get("task_1")
    assert record.status == "completed" and record.result == {"answer": "new"} and record.error is None
    assert [p.name for p in store.task_dir("task_1").iterdir()] == ["result-2.json"]


def test_an_old_attempt_that_finishes_first_is_fenced_too(store: PostgresTaskStore) -> None:
    """Takeover began, then the old run's result arrives before the new one's: still refused (the token moved)."""
    old = started(store)
    new = task_ref("task_1", store.begin_attempt("task_1", "replica-b"))
    assert not store.complete(old, {"answer": "old"})
    assert store.get("task_1").status == "processing"
    assert store.complete(new, {"answer": "new"}) and store.get("task_1").result == {"answer": "new"}


def test_hand_back_returns_the_task_to_the_queue_for_the_next_attempt(store: PostgresTaskStore) -> None:
    ref = started(store)
    store.report(ref, "preprocessing")
    assert store.hand_back(ref)
    record = store.get("task_1")
    assert (record.status, record.current_step, record.progress) == ("pending", "queued", 15)
    with pytest.raises(TaskSuperseded):
        store.report(ref, "inference", 50)  # the handed-back run's runner, still busy: stopped, nothing written
    assert store.get("task_1").status == "pending"
    assert store.begin_attempt("task_1", "replica-b") == 2
    assert not store.hand_back(ref)  # a superseded run cannot hand back the new one


def test_cancel_from_any_replica_stops_the_run_and_the_queue(store: PostgresTaskStore) -> None:
    ref = started(store)
    record = store.cancel("task_1")  # sent to another replica: the same database
    assert record.status == "cancelled" and record.cancel_requested and record.to_json()["cancelled_at"]
    with pytest.raises(TaskCancelled) as raised:
        store.report(ref, "inference", 60)
    assert not isinstance(raised.value, TaskSuperseded) and store.get("task_1").progress == 0
    assert not store.complete(ref, {"late": True}) and store.get("task_1").status == "cancelled"
    store.create("task_2", None, None)
    store.cancel("task_2")
    assert store.begin_attempt("task_2", "replica-a") is None  # a cancelled queued task never starts


def test_failure_sets_the_cancel_flag_and_keeps_the_error(store: PostgresTaskStore) -> None:
    ref = started(store)
    assert store.fail(ref, error_body("IMAGE_TOO_LARGE", "too big", {"limit": 1}))
    record = store.get("task_1")
    assert record.status == "failed" and record.cancel_requested
    assert record.error["code"] == "IMAGE_TOO_LARGE" and record.error["details"] == {"limit": 1}


def test_registration_is_idempotent_and_fills_in_what_it_lacked(store: PostgresTaskStore) -> None:
    store.create("task_1", None, None)  # the submit's answer registers it first
    store.create("task_1", "req-9", "mri_segmentation")  # then the body
    record = store.get("task_1")
    assert (record.status, record.request_id, record.model_id) == ("pending", "req-9", "mri_segmentation")


def test_a_task_never_queued_fails_after_the_deadline(store: PostgresTaskStore) -> None:
    store.create("task_1", None, None)
    assert store.get("task_1").status == "pending"
    with store._connect() as connection:
        connection.execute(f"UPDATE {TABLE} SET created_at = %s", (time.time() - QUEUEING_DEADLINE_S - 1,))
    record = store.get("task_1")
    assert record.status == "failed" and record.error["details"] == {"reason": "never_queued"}


def test_task_ids_cannot_escape_the_shared_folder(store: PostgresTaskStore) -> None:
    for bad in ("", "../x", ".hidden", "a/b"):
        with pytest.raises(ValueError):
            store.task_dir(bad)
    assert store.get("unknown") is None and store.cancel("unknown") is None
