"""Our durable state of long-running tasks (MRI segmentation): status, progress, step, result or error, cancel flag.

Embedded (one machine, the default): one SQLite file (WAL) under `settings.data_dir`, shared by the API workers that
run task bodies and the runner processes that do the inference: the runner reports progress into it and checks the
cancel flag between window batches, so cancelling really stops the work. Unlike BentoML's own task store, this one
survives a restart; a task whose worker died is reported failed when read.

Distributed (`settings.distributed.enabled`): the same interface on PostgreSQL (`state.pg_tasks`), shared by every
replica; `state.stores.open_task_store` picks the store. There a task may run more than once (a replica that held it stopped
answering and another took it over), so the work of one attempt addresses the task by a *reference*
`<task id>@<attempt>` (`task_ref`): the attempt number is a fencing token, and every write of a superseded attempt is
refused (`TaskSuperseded`). The embedded store accepts references too and ignores the attempt.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from core.errors import NeuroNovaError, error_body

TaskStatus = Literal["pending", "processing", "completed", "failed", "cancelled"]
ACTIVE: tuple[TaskStatus, ...] = ("pending", "processing")
RETENTION_SECONDS = 24 * 3600
RESERVED_PREFIX = "reserved-"
"""Id of a row held for a submission in flight (`TaskStore.reserve`)."""
PACS_RUN_PREFIX = "pacs-"
"""Id prefix of the record a PACS job's run keeps of its MRI work (progress, cancel flag): the PACS job owns it (its
lease, its later runs close it), not the MRI queue, whose orphan sweep leaves it alone."""
STEP_PROGRESS: dict[str, int] = {
    "queued": 0, "decoding": 5, "preprocessing": 15, "inference": 25, "explaining": 85, "postprocessing": 88,
    "writing_outputs": 94, "completed": 100,
}
"""Progress (0-100) when each step starts; inference fills 25-85 window batch by window batch."""
INFERENCE_PROGRESS_END = 85

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    request_id TEXT,
    model_id TEXT,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    current_step TEXT NOT NULL DEFAULT 'queued',
    estimated_remaining_seconds REAL,
    owner_pid INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    finished_at REAL,
    result TEXT,
    error TEXT
)
"""


class TaskCancelled(Exception):
    """Raised inside a task (API body or runner) once its cancel flag is seen; the work stops there."""


class TaskSuperseded(TaskCancelled):
    """Raised inside an attempt of a task that another attempt has taken over: it stops and writes nothing."""


class TaskStates(Protocol):
    """What the API, the task bodies and the runners use of a task store (`TaskStore`, `PostgresTaskStore`)."""

    def create(self, task_id: str, request_id: str | None, model_id: str | None) -> None: ...
    def report(self, task_id: str, step: str, progress: int | None = None, eta_seconds: float | None = None) -> None: ...
    def raise_if_cancelled(self, task_id: str) -> None: ...
    def cancel_requested(self, task_id: str) -> bool: ...
    def complete(self, task_id: str, result: dict[str, Any]) -> bool: ...
    def fail(self, task_id: str, error: NeuroNovaError | dict[str, Any]) -> bool: ...
    def cancel(self, task_id: str) -> TaskRecord | None: ...
    def get(self, task_id: str) -> TaskRecord | None: ...
    def active_of_request(self, request_id: str) -> list[str]: ...
    def backlog(self) -> Backlog: ...
    def set_owner(self, task_id: str, subject: str) -> None: ...
    def owner(self, task_id: str) -> str | None: ...


def visible_to(tasks: TaskStates, task_id: str, subject: str) -> bool:
    """Whether `subject` may see a task: its submitter's, or one without a recorded submitter (auth off at
    submission, a PACS job's). Another subject is told the task does not exist."""
    owner = tasks.owner(split_ref(task_id)[0])
    return owner is None or owner == subject


OWNERS_SCHEMA = ("CREATE TABLE IF NOT EXISTS {table} (task_id TEXT PRIMARY KEY, subject TEXT NOT NULL, "
                 "created_at {seconds} NOT NULL)")
"""Who submitted each task (the token's owner claim), recorded before the submission is answered."""


@dataclass(frozen=True)
class Backlog:
    """Unfinished tasks: how many in each active status, and when the oldest of them was submitted."""

    counts: dict[str, int]
    oldest_created_at: float | None

    @classmethod
    def from_rows(cls, rows: list[tuple[str, int, float]]) -> Backlog:
        """From (status, count, oldest created_at) rows of the active statuses."""
        return cls(counts={status: 0 for status in ACTIVE} | {status: int(n) for status, n, _ in rows},
                   oldest_created_at=min((float(oldest) for _, _, oldest in rows), default=None))


BACKLOG_SQL = ("SELECT status, COUNT(*), MIN(created_at) FROM {table} WHERE status IN ('pending', 'processing') "
               "GROUP BY status")


def task_ref(task_id: str, attempt: int | None) -> str:
    """How one attempt's work addresses its task (the task id alone where there are no attempts)."""
    return task_id if attempt is None else f"{task_id}@{attempt}"


def split_ref(ref: str) -> tuple[str, int | None]:
    """`task_ref`'s inverse: the task id and the attempt (None for a plain task id)."""
    task_id, sep, attempt = ref.rpartition("@")
    return (task_id, int(attempt)) if sep and attempt.isdigit() else (ref, None)


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    request_id: str | None
    model_id: str | None
    status: TaskStatus
    progress: int
    current_step: str
    estimated_remaining_seconds: float | None
    cancel_requested: bool
    created_at: float
    finished_at: float | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    attempt: int = 0
    """Runs of the task so far (distributed mode: more than one after a takeover); not part of the polling body."""

    def to_json(self) -> dict[str, Any]:
        """The original design's polling body (`TaskStatusResponse` fields)."""
        finished = _iso(self.finished_at)
        return {
            "task_id": self.task_id, "status": self.status, "progress": self.progress,
            "current_step": self.current_step, "estimated_remaining_seconds": self.estimated_remaining_seconds,
            "created_at": _iso(self.created_at),
            "completed_at": finished if self.status == "completed" else None,
            "failed_at": finished if self.status == "failed" else None,
            "cancelled_at": finished if self.status == "cancelled" else None,
            "result": self.result, "error": self.error,
        }


def _iso(timestamp: float | None) -> str | None:
    return datetime.fromtimestamp(timestamp, UTC).isoformat() if timestamp is not None else None


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TaskStore:
    """Task rows in one SQLite file; every method opens its own short connection (safe across processes)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._connect() as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(_SCHEMA)
            connection.execute(OWNERS_SCHEMA.format(table="task_owners", seconds="REAL"))

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(self.path, timeout=30.0)
        try:
            with connection:
                yield connection
        finally:
            connection.close()

    def create(self, task_id: str, request_id: str | None, model_id: str) -> None:
        """Register a task as pending (owned by this process), or fill in the request and model of one registered at
        submission (`reserve`); purges finished rows past retention."""
        now, task_id = time.time(), split_ref(task_id)[0]
        with self._connect() as connection:
            connection.execute("DELETE FROM tasks WHERE finished_at IS NOT NULL AND finished_at < ?",
                               (now - RETENTION_SECONDS,))
            connection.execute(
                "INSERT INTO tasks (task_id, request_id, model_id, status, owner_pid, created_at) "
                "VALUES (?, ?, ?, 'pending', ?, ?) ON CONFLICT (task_id) DO UPDATE SET "
                "request_id = COALESCE(tasks.request_id, excluded.request_id), "
                "model_id = COALESCE(tasks.model_id, excluded.model_id)",
                (task_id, request_id, model_id, os.getpid(), now),
            )

    def reserve(self, limit: int) -> str | None:
        """Hold a pending row for a submission about to be made, when fewer than `limit` tasks are unfinished: its id
        (a placeholder, see `settle_reservation`), else None (the queue is full). Count and insert are one statement,
        so submissions arriving together in every API worker never pass the bound together."""
        placeholder = f"{RESERVED_PREFIX}{uuid.uuid4().hex}"
        with self._connect() as connection:
            inserted = connection.execute(
                "INSERT INTO tasks (task_id, status, owner_pid, created_at) SELECT ?, 'pending', ?, ? "
                "WHERE (SELECT COUNT(*) FROM tasks WHERE status IN ('pending', 'processing')) < ?",
                (placeholder, os.getpid(), time.time(), limit)).rowcount
        return placeholder if inserted else None

    def settle_reservation(self, placeholder: str, task_id: str | None) -> None:
        """The row `reserve` held becomes the submitted task's, or goes (`task_id` None: the submission failed)."""
        with self._connect() as connection:
            if task_id is None:
                connection.execute("DELETE FROM tasks WHERE task_id = ?", (placeholder,))
            else:
                connection.execute("UPDATE tasks SET task_id = ? WHERE task_id = ?", (task_id, placeholder))

    def report(self, task_id: str, step: str, progress: int | None = None, eta_seconds: float | None = None) -> None:
        """Enter `step` (progress defaults to the step's start); raises TaskCancelled if cancel was requested."""
        value = STEP_PROGRESS.get(step, 0) if progress is None else progress
        task_id = split_ref(task_id)[0]
        with self._connect() as connection:
            connection.execute(
                "UPDATE tasks SET status = 'processing', current_step = ?, progress = MAX(progress, ?), "
                "estimated_remaining_seconds = ? WHERE task_id = ? AND status IN ('pending', 'processing')",
                (step, min(int(value), 99), eta_seconds, task_id),
            )
        self.raise_if_cancelled(task_id)

    def raise_if_cancelled(self, task_id: str) -> None:
        if self.cancel_requested(task_id):
            raise TaskCancelled(task_id)

    def cancel_requested(self, task_id: str) -> bool:
        task_id = split_ref(task_id)[0]
        with self._connect() as connection:
            row = connection.execute("SELECT cancel_requested FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        return bool(row and row[0])

    def complete(self, task_id: str, result: dict[str, Any]) -> bool:
        """Commit the result of an active task; False when it was cancelled or finished meanwhile."""
        return self._finish(task_id, "completed", result=result)

    def fail(self, task_id: str, error: NeuroNovaError | dict[str, Any]) -> bool:
        """Fail an active task; its cancel flag is set too, so work still running for it (a runner past a step's
        budget, a worker shutting down) stops at its next check instead of holding the model."""
        body = error.to_body() if isinstance(error, NeuroNovaError) else error
        return self._finish(task_id, "failed", error=body["error"])

    def _finish(self, task_id: str, status: TaskStatus, result: dict | None = None, error: dict | None = None) -> bool:
        task_id = split_ref(task_id)[0]
        with self._connect() as connection:
            return connection.execute(
                "UPDATE tasks SET status = ?, progress = CASE WHEN ? = 'completed' THEN 100 ELSE progress END, "
                "cancel_requested = CASE WHEN ? = 'failed' THEN 1 ELSE cancel_requested END, "
                "current_step = ?, estimated_remaining_seconds = 0, finished_at = ?, result = ?, error = ? "
                "WHERE task_id = ? AND status IN ('pending', 'processing')",
                (status, status, status, status, time.time(), json.dumps(result) if result is not None else None,
                 json.dumps(error) if error is not None else None, task_id),
            ).rowcount == 1

    def fail_unfinished(self, error: dict[str, Any], owner_pid: int | None = None) -> list[str]:
        """Fail the active tasks of `owner_pid` — or, without one, those whose owner process is gone — with the SPEC
        error body `error`; the ids. For a server that stops, or starts after a crash: no task is left `processing`
        for ever, and a task another live server runs on the same data directory is left to it."""
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT task_id, owner_pid FROM tasks WHERE status IN ('pending', 'processing')").fetchall()

        def is_target(owner: int | None) -> bool:
            return owner == owner_pid if owner_pid is not None else owner is None or not _pid_alive(owner)

        failed = [task_id for task_id, owner in rows if is_target(owner)]
        for task_id in failed:
            self.fail(task_id, error)
        return failed

    def active_of_request(self, request_id: str) -> list[str]:
        """The ids of the active tasks recorded for `request_id`."""
        with self._connect() as connection:
            return [row[0] for row in connection.execute(
                "SELECT task_id FROM tasks WHERE request_id = ? AND status IN ('pending', 'processing')", (request_id,))]

    def cancel(self, task_id: str) -> TaskRecord | None:
        """Set the cancel flag and mark an active task cancelled at once (its work stops at the next check)."""
        with self._connect() as connection:
            connection.execute(
                "UPDATE tasks SET cancel_requested = 1, status = 'cancelled', current_step = 'cancelled', "
                "estimated_remaining_seconds = 0, finished_at = ? WHERE task_id = ? AND status IN ('pending', 'processing')",
                (time.time(), task_id),
            )
        return self.get(task_id)

    def backlog(self) -> Backlog:
        with self._connect() as connection:
            return Backlog.from_rows(connection.execute(BACKLOG_SQL.format(table="tasks")).fetchall())

    def set_owner(self, task_id: str, subject: str) -> None:
        """Record a task's submitter (the first record stands); purges records past retention."""
        now = time.time()
        with self._connect() as connection:
            connection.execute("DELETE FROM task_owners WHERE created_at < ?", (now - 2 * RETENTION_SECONDS,))
            connection.execute("INSERT OR IGNORE INTO task_owners VALUES (?, ?, ?)", (task_id, subject, now))

    def owner(self, task_id: str) -> str | None:
        with self._connect() as connection:
            row = connection.execute("SELECT subject FROM task_owners WHERE task_id = ?", (task_id,)).fetchone()
        return row[0] if row else None

    def get(self, task_id: str) -> TaskRecord | None:
        """The task, or None; an active task whose worker process is gone is failed first."""
        with self._connect() as connection:
            row = connection.execute(
                "SELECT task_id, request_id, model_id, status, progress, current_step, estimated_remaining_seconds, "
                "cancel_requested, created_at, finished_at, result, error, owner_pid FROM tasks WHERE task_id = ?",
                (task_id,),
            ).fetchone()
        if row is None:
            return None
        if row[3] in ACTIVE and not _pid_alive(row[12]):
            self.fail(task_id, error_body("INTERNAL_SERVER_ERROR", "the server stopped while this task ran; submit it again"))
            return self.get(task_id)
        return TaskRecord(
            task_id=row[0], request_id=row[1], model_id=row[2], status=row[3], progress=row[4], current_step=row[5],
            estimated_remaining_seconds=row[6], cancel_requested=bool(row[7]), created_at=row[8], finished_at=row[9],
            result=json.loads(row[10]) if row[10] else None, error=json.loads(row[11]) if row[11] else None,
        )


def task_store_path(data_dir: str | Path) -> Path:
    """Where the task store lives under the settings' data directory (a private folder)."""
    return Path(data_dir) / "tasks" / "tasks.sqlite"
