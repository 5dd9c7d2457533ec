"""Task step budgets and the shutdown/restart helpers (the served behaviour: tests/http/test_shutdown_http.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from _bentoml_impl.tasks.result import Sqlite3Store

from pipelines.budgets import StepBudgetExceeded, scaled, within_budget
from api.shutdown import (
    ARBITER_PID,
    arbiter_pid,
    fail_own_tasks,
    is_bentoml_worker,
    mark_arbiter,
    recover_after_crash,
    remove_stale_sqlite_sidecars,
)
from state.tasks import TaskStore, task_store_path

ROOT = Path(__file__).resolve().parents[3]


def test_a_step_past_its_budget_fails_with_a_clear_error() -> None:
    async def run() -> None:
        await within_budget("decoding", asyncio.sleep(30), {"decoding": 0.05})

    with pytest.raises(StepBudgetExceeded) as failed:
        asyncio.run(run())
    assert failed.value.code == "INTERNAL_SERVER_ERROR" and failed.value.status == 500
    assert failed.value.details == {"reason": "step_budget_exceeded", "step": "decoding", "budget_seconds": 0.05}


def test_a_step_within_or_without_a_budget_returns_its_value() -> None:
    async def value() -> int:
        return 7

    assert asyncio.run(within_budget("decoding", value(), {"decoding": 5.0})) == 7
    assert asyncio.run(within_budget("other", value(), {"decoding": 5.0})) == 7


def test_tests_are_not_bentoml_workers() -> None:
    assert not is_bentoml_worker()


HOLDER = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1])
connection.execute("PRAGMA journal_mode=WAL")
connection.execute("CREATE TABLE t (x)")
connection.commit()
print("ready", flush=True)
while True:
    connection.execute("INSERT INTO t VALUES (1)")
    connection.commit()
    time.sleep(0.02)
"""


def test_restart_fails_left_tasks_and_a_fresh_task_db_works_beside_an_orphan_holding_the_old_one(tmp_path) -> None:
    tasks = TaskStore(task_store_path(tmp_path))
    tasks.create("left", None, "mri_segmentation")
    killed_server = subprocess.Popen([sys.executable, "-c", "pass"])
    killed_server.wait()
    with sqlite3.connect(tasks.path) as connection:  # the task's worker died with its server
        connection.execute("UPDATE tasks SET owner_pid = ? WHERE task_id = 'left'", (killed_server.pid,))
    result_store = tmp_path / "task_result.db"
    orphan = subprocess.Popen([sys.executable, "-c", HOLDER, str(result_store)], stdout=subprocess.PIPE)
    try:
        assert orphan.stdout.readline() == b"ready\n"
        assert (tmp_path / "task_result.db-wal").exists() and (tmp_path / "task_result.db-shm").exists()
        recover_after_crash(tasks, result_store)
        result_store.unlink()  # what BentoML does next, then Sqlite3Store.init_db (without the clean-up: disk I/O error)
        Sqlite3Store.init_db(str(result_store))
        with sqlite3.connect(result_store) as connection:
            assert connection.execute("SELECT count(*) FROM result").fetchone() == (0,)
    finally:
        orphan.kill()
        orphan.wait()
    record = tasks.get("left")
    assert record.status == "failed" and record.error["details"] == {"reason": "server_restarted"}
    assert remove_stale_sqlite_sidecars(tmp_path / "absent.db") == []


def test_the_shutdown_deadline_fails_only_this_workers_tasks(tmp_path) -> None:
    tasks = TaskStore(task_store_path(tmp_path))
    tasks.create("mine", None, "mri_segmentation")
    tasks.create("another_workers", None, "mri_segmentation")
    with sqlite3.connect(tasks.path) as connection:
        connection.execute("UPDATE tasks SET owner_pid = ? WHERE task_id = 'another_workers'", (os.getppid(),))
    fail_own_tasks(tasks)
    record = tasks.get("mine")
    assert record.status == "failed" and record.error["details"] == {"reason": "server_shutdown"}
    assert tasks.get("another_workers").status == "pending"


def test_a_step_doing_n_times_the_work_gets_n_times_its_budget() -> None:
    budgets = {"inference": 900.0, "decoding": 60.0}
    assert scaled(budgets, "inference", 8) == {"inference": 7200.0, "decoding": 60.0}
    assert scaled(budgets, "explaining", 8) == budgets and budgets["inference"] == 900.0


ORPHANED_WORKER = """
import threading
from api.shutdown import arbiter_pid, _watch_parent
threading.Thread(target=_watch_parent, args=(arbiter_pid(),), daemon=True).start()
threading.Event().wait(120)
"""


def test_a_worker_whose_arbiter_died_before_its_guard_started_ends_itself() -> None:
    """The arbiter is named in the environment: a worker that was still importing when its arbiter was SIGKILLed
    (its parent is already init, or here a live test process) still sees that its arbiter is gone, and ends."""
    arbiter = subprocess.Popen([sys.executable, "-c", "pass"])
    arbiter.wait()
    worker = subprocess.Popen([sys.executable, "-c", ORPHANED_WORKER], cwd=ROOT,
                              env={**os.environ, ARBITER_PID: str(arbiter.pid)})
    try:
        assert worker.wait(timeout=60) == -signal.SIGTERM
    finally:
        worker.kill()
        worker.wait()


def test_the_arbiter_names_itself_for_its_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ARBITER_PID, raising=False)
    assert arbiter_pid() == os.getppid()
    monkeypatch.setenv(ARBITER_PID, "")
    mark_arbiter()
    assert os.environ[ARBITER_PID] == str(os.getpid()) and arbiter_pid() == os.getpid()
