"""Task step budgets and the shutdown/restart helpers (the served behaviour: tests/http/test_shutdown_http.py)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys

import pytest
from _bentoml_impl.tasks.result import Sqlite3Store

from api.budgets import StepBudgetExceeded, scaled, within_budget
from api.shutdown import fail_own_tasks, is_bentoml_worker, recover_after_crash, remove_stale_sqlite_sidecars
from core.tasks import TaskStore, task_store_path


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
