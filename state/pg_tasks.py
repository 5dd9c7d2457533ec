"""Task state on PostgreSQL, shared by every replica (distributed mode): the interface of `state.tasks.TaskStore`.

A row per task holds what the polling body shows (status, progress, step, error, cancel flag), the request's
parameters for whichever replica runs it, and the **attempt**: each run of the task (the first, or a takeover after
the replica running it stopped answering) increments it (`begin_attempt`), and every write of that run — progress,
result, error, hand-back — is made with `WHERE attempt = <its attempt>`. A run that was superseded therefore changes
nothing (its next progress report raises `TaskSuperseded`, so it stops), and the caller sees exactly one result.

Results are bulky (the mask as base64 NIfTI, DICOM SEG): each attempt writes its own file on the shared volume once
(`<shared_dir>/tasks/<id>/result-<attempt>.json`, created by a hard link, so never overwritten or seen half-written),
and the row names the file of the attempt that committed. Nothing here is SQLite on a network filesystem.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
from psycopg.types.json import Jsonb

from core.errors import DependencyUnavailable, NeuroNovaError, error_body
from state import shared_db
from state.dependency_health import file_io_on, shared_volume
from state.shared_db import database_health
from core.settings import Settings
from state.tasks import (
    BACKLOG_SQL,
    OWNERS_SCHEMA,
    PACS_RUN_PREFIX,
    RETENTION_SECONDS,
    Backlog,
    STEP_PROGRESS,
    TaskCancelled,
    TaskRecord,
    TaskStatus,
    TaskSuperseded,
    split_ref,
)

log = logging.getLogger("neuronova.tasks")
TABLE = "neuronova_tasks"
OWNERS = "neuronova_task_owners"
SCHEMA_LOCK = 0x4E4E_5441  # pg_advisory_xact_lock key: replicas starting together create the table once
QUEUEING_DEADLINE_S = 120.0
"""A task accepted but never queued this long ago (its replica stopped between answering and queuing) is failed."""
ORPHAN_GRACE_S = 30.0
"""An active task with no job of the queue holding it for this long is an orphan (`sweep`): its job was lost."""
MAX_REQUEUES = 3
"""How often an orphan is queued again before it is failed (`details.reason: job_lost`)."""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    task_id text PRIMARY KEY,
    request_id text,
    model_id text,
    status text NOT NULL,
    progress integer NOT NULL DEFAULT 0,
    current_step text NOT NULL DEFAULT 'queued',
    estimated_remaining_seconds double precision,
    cancel_requested boolean NOT NULL DEFAULT false,
    created_at double precision NOT NULL,
    finished_at double precision,
    result_file text,
    error jsonb,
    attempt integer NOT NULL DEFAULT 0,
    owner text,
    params jsonb
);
ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS requeued integer NOT NULL DEFAULT 0
"""
SWEEP_LOCK = 0x4E4E_5357  # pg_try_advisory_xact_lock key: one orphan sweep at a time
ORPHAN_MESSAGES = {
    "never_queued": "the replica that accepted this task stopped before queuing it; submit it again",
    "job_lost": f"the task's queued job was lost {MAX_REQUEUES} times; submit it again",
}


class Swept(NamedTuple):
    """What one orphan sweep did: the tasks to queue again (their rows counted), the tasks it failed."""

    requeue: list[str]
    failed: list[str]


_ACTIVE_SQL = "status IN ('pending', 'processing')"
_FENCE = (f"task_id = %(task_id)s AND (%(attempt)s::integer IS NULL AND {_ACTIVE_SQL} "
          "OR attempt = %(attempt)s::integer AND status = 'processing')")
"""Which row a write may change: a plain task id, an active task; an attempt's reference, the task only while that
attempt runs it (not after a takeover, a cancel, a hand-back or its end)."""


class PostgresTaskStore:
    """Task rows in PostgreSQL; each call borrows a connection of the process's pool (any process, any thread). While
    the database or the shared volume is unreachable every call raises `DependencyUnavailable` at once
    (`state.dependency_health`), except progress reports, which are skipped."""

    def __init__(self, database_url: str, shared_dir: str | Path) -> None:
        self.database_url = database_url
        self.database = database_health(database_url)
        self.volume = shared_volume(shared_dir)
        self.tasks_dir = Path(shared_dir) / "tasks"
        self.tasks_dir.mkdir(parents=True, exist_ok=True)
        with self._connect() as connection:
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            connection.execute(_SCHEMA)
            connection.execute(OWNERS_SCHEMA.format(table=OWNERS, seconds="double precision"))

    @classmethod
    def from_settings(cls, settings: Settings) -> PostgresTaskStore:
        distributed = settings.distributed
        if not distributed.shared_dir:
            raise ValueError("NEURONOVA_DISTRIBUTED__SHARED_DIR is required with NEURONOVA_DISTRIBUTED__DATABASE_URL")
        return cls(distributed.database_url or "", distributed.shared_dir)

    @contextmanager
    def _connect(self) -> Iterator[psycopg.Connection]:
        """A connection of this process's pool (`state.shared_db.connection`: bounded, rows as dicts);
        `DependencyUnavailable` (the breaker tripped) when it cannot be made or is lost midway."""
        with shared_db.connection(self.database_url) as connection:
            yield connection

    def on_volume(self) -> AbstractContextManager[None]:
        """File I/O on the shared volume, guarded by its breaker (`state.dependency_health.file_io_on`)."""
        return file_io_on(self.volume)

    def check_available(self) -> None:
        """Raise `DependencyUnavailable` at once while the database or the shared volume is known unreachable."""
        self.database.check()
        self.volume.check()

    def ready(self) -> bool:
        """Whether the database and the shared volume are usable now (probed when nothing has for a while)."""
        return set(self.dependencies().values()) == {"ok"}

    def dependencies(self) -> dict[str, str]:
        """`ok`, or the reason it cannot be used now, of the database and the shared volume (probed as by `ready`)."""
        return {name: "ok" if health.ready() else health.reason
                for name, health in (("database", self.database), ("shared_volume", self.volume))}

    def task_dir(self, task_id: str) -> Path:
        """The task's folder on the shared volume (uploads, results)."""
        if not task_id or "/" in task_id or task_id.startswith("."):
            raise ValueError(f"not a task id: {task_id!r}")
        return self.tasks_dir / task_id

    def create(self, ref: str, request_id: str | None, model_id: str | None) -> None:
        """Register a task as pending (again: fills in what an earlier registration lacked); purges finished rows
        past retention with their files."""
        task_id, _ = split_ref(ref)
        now = time.time()
        with self._connect() as connection:
            expired = connection.execute(
                f"DELETE FROM {TABLE} WHERE finished_at IS NOT NULL AND finished_at < %s RETURNING task_id",
                (now - RETENTION_SECONDS,)).fetchall()
            connection.execute(
                f"INSERT INTO {TABLE} AS t (task_id, request_id, model_id, status, created_at) "
                "VALUES (%s, %s, %s, 'pending', %s) ON CONFLICT (task_id) DO UPDATE SET "
                "request_id = COALESCE(t.request_id, EXCLUDED.request_id), model_id = COALESCE(t.model_id, EXCLUDED.model_id)",
                (task_id, request_id, model_id, now))
        for row in expired:
            shutil.rmtree(self.task_dir(row["task_id"]), ignore_errors=True)

    def set_params(self, task_id: str, params: dict[str, Any]) -> None:
        """Record what a run of the task needs (the request's parameters, its uploads on the shared volume)."""
        with self._connect() as connection:
            connection.execute(f"UPDATE {TABLE} SET params = %s WHERE task_id = %s", (Jsonb(params), task_id))

    def params(self, task_id: str) -> dict[str, Any] | None:
        with self._connect() as connection:
            row = connection.execute(f"SELECT params FROM {TABLE} WHERE task_id = %s", (task_id,)).fetchone()
        return row["params"] if row else None

    def begin_attempt(self, task_id: str, owner: str) -> int | None:
        """Start a new attempt of an active, not cancelled task: its number (the fencing token of every write of this
        run), or None when there is nothing to run (finished, cancelled or unknown)."""
        with self._connect() as connection:
            row = connection.execute(
                f"UPDATE {TABLE} SET attempt = attempt + 1, owner = %s, status = 'processing', "
                f"estimated_remaining_seconds = NULL WHERE task_id = %s AND {_ACTIVE_SQL} AND NOT cancel_requested "
                "RETURNING attempt", (owner, task_id)).fetchone()
        return row["attempt"] if row else None

    def report(self, ref: str, step: str, progress: int | None = None, eta_seconds: float | None = None) -> None:
        """Enter `step` (progress never goes back); raises TaskSuperseded or TaskCancelled when this run must stop."""
        task_id, attempt = split_ref(ref)
        value = STEP_PROGRESS.get(step, 0) if progress is None else progress
        try:
            with self._connect() as connection:
                connection.execute(
                    f"UPDATE {TABLE} SET status = 'processing', current_step = %(step)s, "
                    "progress = GREATEST(progress, %(progress)s), estimated_remaining_seconds = %(eta)s "
                    f"WHERE {_FENCE}",
                    {"step": step, "progress": min(int(value), 99), "eta": eta_seconds, "task_id": task_id,
                     "attempt": attempt})
            self.raise_if_cancelled(ref)
        except DependencyUnavailable as exc:  # progress is advisory: the run goes on; its commit is fenced anyway
            log.warning("progress of task %s not recorded (%s): %s", ref, exc.details["reason"], step)

    def raise_if_cancelled(self, ref: str) -> None:
        """Raise TaskCancelled once the task's cancel flag is set; for an attempt's reference, TaskSuperseded once that
        attempt no longer runs the task (taken over, or handed back)."""
        task_id, attempt = split_ref(ref)
        with self._connect() as connection:
            row = connection.execute(f"SELECT cancel_requested, attempt, status FROM {TABLE} WHERE task_id = %s",
                                     (task_id,)).fetchone()
        if row and row["cancel_requested"]:
            raise TaskCancelled(ref)
        if row and attempt is not None and (row["attempt"], row["status"]) != (attempt, "processing"):
            raise TaskSuperseded(ref)

    def cancel_requested(self, ref: str) -> bool:
        """Whether this run must stop: cancelled, or (for an attempt's reference) superseded."""
        try:
            self.raise_if_cancelled(ref)
        except TaskCancelled:
            return True
        return False

    def complete(self, ref: str, result: dict[str, Any]) -> bool:
        """Commit this run's result (its own write-once file); False, and the file removed, when the run was
        superseded or the task is no longer active."""
        task_id, attempt = split_ref(ref)
        folder = self.task_dir(task_id)
        with self.on_volume():
            path = self.write_once(folder / f"result-{attempt or 0}.json", json.dumps(result).encode())
        committed = self._finish(ref, "completed", result_file=path.name)  # raised: the file stays (outcome unknown)
        if not committed:
            path.unlink(missing_ok=True)
            return False
        for other in folder.glob("result-*.json"):  # an earlier attempt's, whose own commit could not be answered
            if other != path:
                other.unlink(missing_ok=True)
        return True

    def fail(self, ref: str, error: NeuroNovaError | dict[str, Any]) -> bool:
        """Fail an active task (this run's, when a reference); its cancel flag is set, so no other run goes on."""
        body = error.to_body() if isinstance(error, NeuroNovaError) else error
        return self._finish(ref, "failed", error=body["error"])

    def _finish(self, ref: str, status: TaskStatus, result_file: str | None = None, error: dict | None = None) -> bool:
        task_id, attempt = split_ref(ref)
        with self._connect() as connection:
            done = connection.execute(
                f"UPDATE {TABLE} SET status = %(status)s, progress = CASE WHEN %(status)s = 'completed' THEN 100 "
                "ELSE progress END, cancel_requested = cancel_requested OR %(status)s = 'failed', "
                "current_step = %(status)s, estimated_remaining_seconds = 0, finished_at = %(now)s, "
                f"result_file = %(result_file)s, error = %(error)s WHERE {_FENCE}",
                {"status": status, "now": time.time(), "result_file": result_file,
                 "error": Jsonb(error) if error is not None else None, "task_id": task_id, "attempt": attempt})
        return done.rowcount == 1

    def hand_back(self, ref: str) -> bool:
        """Return a running task to the queue's view (pending, step `queued`) because this run stops without finishing
        it (its replica shuts down); fenced like every write of a run."""
        task_id, attempt = split_ref(ref)
        with self._connect() as connection:
            done = connection.execute(
                f"UPDATE {TABLE} SET status = 'pending', current_step = 'queued', owner = NULL, "
                f"estimated_remaining_seconds = NULL WHERE {_FENCE} AND status = 'processing'",
                {"task_id": task_id, "attempt": attempt})
        return done.rowcount == 1

    def active_of_request(self, request_id: str) -> list[str]:
        """The ids of the active tasks recorded for `request_id`."""
        with self._connect() as connection:
            return [row["task_id"] for row in connection.execute(
                f"SELECT task_id FROM {TABLE} WHERE request_id = %s AND {_ACTIVE_SQL}", (request_id,))]

    def cancel(self, task_id: str) -> TaskRecord | None:
        """Set the cancel flag and mark an active task cancelled at once (its run stops at its next check, on
        whichever replica it runs)."""
        with self._connect() as connection:
            connection.execute(
                f"UPDATE {TABLE} SET cancel_requested = true, status = 'cancelled', current_step = 'cancelled', "
                f"estimated_remaining_seconds = 0, finished_at = %s WHERE task_id = %s AND {_ACTIVE_SQL}",
                (time.time(), task_id))
        return self.get(task_id)

    def backlog(self) -> Backlog:
        with self._connect() as connection:
            return Backlog.from_rows([tuple(row.values()) for row in
                                      connection.execute(BACKLOG_SQL.format(table=TABLE)).fetchall()])

    def sweep(self, job_table: str, task_name: str, now: float | None = None) -> Swept:
        """Find the active tasks no job of the queue holds (`job_table` rows of `task_name` waiting or running for
        them): an orphan whose job was lost (a failed `defer`, a job the queue gave up on) for `ORPHAN_GRACE_S` is
        counted for queuing again, up to `MAX_REQUEUES` times, then failed (`job_lost`); a task never queued for
        `QUEUEING_DEADLINE_S` is failed (`never_queued`). One sweeper at a time across replicas (an advisory lock)."""
        now = time.time() if now is None else now
        with self._connect() as connection, connection.transaction():
            if not connection.execute("SELECT pg_try_advisory_xact_lock(%s) AS mine", (SWEEP_LOCK,)).fetchone()["mine"]:
                return Swept([], [])
            orphans = connection.execute(
                f"SELECT task_id, requeued, params IS NULL AS never_queued FROM {TABLE} t WHERE {_ACTIVE_SQL} "
                "AND NOT cancel_requested AND task_id NOT LIKE %(pacs_runs)s AND (params IS NULL AND "
                "created_at < %(never_queued)s OR "
                "params IS NOT NULL AND created_at < %(orphaned)s AND NOT EXISTS (SELECT 1 FROM "
                f"{job_table} j WHERE j.task_name = %(task_name)s AND j.args->>'task_id' = t.task_id "
                "AND j.status IN ('todo', 'doing'))) FOR UPDATE",
                {"never_queued": now - QUEUEING_DEADLINE_S, "orphaned": now - ORPHAN_GRACE_S,
                 "task_name": task_name, "pacs_runs": f"{PACS_RUN_PREFIX}%"}).fetchall()
            requeue = [row["task_id"] for row in orphans if not row["never_queued"] and row["requeued"] < MAX_REQUEUES]
            connection.execute(f"UPDATE {TABLE} SET requeued = requeued + 1, status = 'pending', "
                               "current_step = 'queued', owner = NULL WHERE task_id = ANY(%s)", (requeue,))
        failed = [row["task_id"] for row in orphans if row["task_id"] not in requeue]
        for row in orphans:
            if row["task_id"] in failed:
                reason = "never_queued" if row["never_queued"] else "job_lost"
                self.fail(row["task_id"], error_body("INTERNAL_SERVER_ERROR", ORPHAN_MESSAGES[reason],
                                                     {"reason": reason}))
        return Swept(requeue, failed)

    def set_owner(self, task_id: str, subject: str) -> None:
        """Record a task's submitter (the first record stands); purges records past retention."""
        now = time.time()
        with self._connect() as connection:
            connection.execute(f"DELETE FROM {OWNERS} WHERE created_at < %s", (now - 2 * RETENTION_SECONDS,))
            connection.execute(f"INSERT INTO {OWNERS} VALUES (%s, %s, %s) ON CONFLICT (task_id) DO NOTHING",
                               (task_id, subject, now))

    def owner(self, task_id: str) -> str | None:
        with self._connect() as connection:
            row = connection.execute(f"SELECT subject FROM {OWNERS} WHERE task_id = %s", (task_id,)).fetchone()
        return row["subject"] if row else None

    def get(self, task_id: str) -> TaskRecord | None:
        """The task, or None; one accepted but never queued for `QUEUEING_DEADLINE_S` is failed first."""
        with self._connect() as connection:
            row = connection.execute(f"SELECT * FROM {TABLE} WHERE task_id = %s", (task_id,)).fetchone()
        if row is None:
            return None
        if (row["status"] == "pending" and row["params"] is None and not task_id.startswith(PACS_RUN_PREFIX)
                and row["created_at"] < time.time() - QUEUEING_DEADLINE_S):
            self.fail(task_id, error_body("INTERNAL_SERVER_ERROR", ORPHAN_MESSAGES["never_queued"],
                                          {"reason": "never_queued"}))
            return self.get(task_id)
        result = None
        if row["result_file"]:
            with self.on_volume():
                result = json.loads((self.task_dir(task_id) / row["result_file"]).read_bytes())
        return TaskRecord(
            task_id=row["task_id"], request_id=row["request_id"], model_id=row["model_id"], status=row["status"],
            progress=row["progress"], current_step=row["current_step"],
            estimated_remaining_seconds=row["estimated_remaining_seconds"], cancel_requested=row["cancel_requested"],
            created_at=row["created_at"], finished_at=row["finished_at"], result=result, error=row["error"],
            attempt=row["attempt"],
        )

    @staticmethod
    def write_once(path: Path, data: bytes) -> Path:
        """Write `path` whole or not at all, never over an existing file (a temporary file, then a hard link)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", delete=False) as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        try:
            os.link(tmp.name, path)
        finally:
            os.unlink(tmp.name)
        return path
