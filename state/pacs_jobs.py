"""The durable PACS job queue: one SQLite file under the data directory, shared by every API worker.

A job is one model run on the series selected from one study. Its idempotency key (StudyInstanceUID + the selected
SeriesInstanceUIDs + the exact model version) is unique, so a repeated notification, or the PACS's stable-study event
firing again once our results land, finds the job it already made and makes none. A study that matched no rule is
kept as a `skipped` row whose reason says so.

Jobs start urgent first (a model rule's `priority`), then in the order they were created.

States: queued -> running (retrieve, infer, build the result objects, write them to the job's folder) -> exporting
(STOW-RS, retried with backoff while the PACS is unreachable) -> done; or failed, or skipped. Every claim of a job
takes the next **attempt** number, and every write of that run names it (`Lease`): a run whose job was claimed again
meanwhile changes nothing. A job caught running by a restart or a takeover runs again, once: a job interrupted twice
fails. A job caught exporting sends the same files again (same UIDs), so the PACS never holds two result sets. No
patient name or id is kept: job rows hold UIDs, model names, states and messages only.

Two backends behind one interface (`PacsJobs`), chosen in `pacs.runtime.open_job_store`: this module's `JobStore`
(embedded: one SQLite file under the data directory; a worker leases a job by its process id, a lease whose process
is gone is free again) and `state.pacs_jobs_pg.PostgresJobStore` (distributed: every replica works one queue in
PostgreSQL, leases expire unless renewed while the job runs).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal, Protocol

from pydantic import BaseModel, Field

from core.priority import RANK, ROUTINE, Priority, priority_of
from state.tasks import _pid_alive

JobState = Literal["queued", "running", "exporting", "done", "failed", "skipped"]
MAX_RUNS = 2
"""A job runs at most twice: once, and once more after a restart (or a takeover) caught it running."""
ACTIVE_STATES = ("running", "exporting")
"""The states a run holds its job in: a fenced write changes the job only in these, under the run's attempt."""
NO_RULE = "no rule matched"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS pacs_jobs (
    job_id TEXT PRIMARY KEY,
    idempotency_key TEXT UNIQUE NOT NULL,
    study_uid TEXT NOT NULL,
    model_id TEXT,
    model_version TEXT,
    series_json TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    runs INTEGER NOT NULL DEFAULT 0,
    export_failures INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    lease_pid INTEGER,
    attempt INTEGER NOT NULL DEFAULT 0,
    results_json TEXT,
    priority INTEGER NOT NULL DEFAULT 0,
    log_json TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pacs_cursors (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pacs_notices (
    study_uid TEXT PRIMARY KEY,
    received_at REAL NOT NULL,
    not_before REAL NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    lease_pid INTEGER
)
"""


def idempotency_key(study_uid: str, series: dict[str, str], model_version: str | None) -> str:
    """sha256 of the study, the selected series (role=UID, sorted) and the model version."""
    parts = [study_uid, *(f"{role}={uid}" for role, uid in sorted(series.items())), model_version or "-"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class Job(BaseModel):
    """A job as operators see it (`GET /pacs/jobs/{id}`)."""

    job_id: str
    study_instance_uid: str
    model_id: str | None
    model_version: str | None
    series: dict[str, str]
    priority: Priority = ROUTINE
    state: JobState
    reason: str | None
    runs: int
    export_failures: int
    results: list[dict[str, str]] | None
    log: list[dict[str, str]]
    created_at: str
    updated_at: str


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


@dataclass(frozen=True)
class Lease:
    """One claimed run of a job: the job as claimed and the run's attempt number, the fencing token every write of
    the run names (a write whose attempt is no longer the job's changes nothing and answers False)."""

    job: Job
    attempt: int

    @property
    def job_id(self) -> str:
        return self.job.job_id


class HeldLock(Protocol):
    """A lock one worker of all holds (the `/changes` poller's): whether it still holds it; release it."""

    def held(self) -> bool: ...
    def close(self) -> None: ...


class PacsJobs(Protocol):
    """What the PACS flow and the routes use of a job store (`JobStore`, `state.pacs_jobs_pg.PostgresJobStore`)."""

    results_dir: Path
    """Where a run writes its job's result files (`<results_dir>/<job id>`), seen by every worker that may export."""

    def add(self, study_uid: str, model_id: str | None, model_version: str | None, series: dict[str, str],
            state: JobState = "queued", reason: str | None = None, priority: Priority = ROUTINE) -> tuple[str, bool]: ...
    def notice(self, study_uid: str) -> None: ...
    def claim_notice(self) -> tuple[str, float] | None: ...
    def notice_handled(self, study_uid: str, received_at: float) -> None: ...
    def notice_failed(self, study_uid: str, delay_s: float) -> int: ...
    def notice_failures(self, study_uid: str) -> int: ...
    def claim(self) -> Lease | None: ...
    def keep_alive(self, lease: Lease) -> AbstractContextManager[None]: ...
    def renew(self, lease: Lease) -> bool: ...
    def log(self, lease: Lease, message: str) -> bool: ...
    def ready_to_export(self, lease: Lease, message: str) -> bool: ...
    def export_failed(self, lease: Lease, message: str, delay_s: float) -> bool: ...
    def retry_later(self, lease: Lease, message: str, delay_s: float) -> bool: ...
    def done(self, lease: Lease, results: Sequence[dict[str, str]], message: str) -> bool: ...
    def fail(self, lease: Lease, reason: str) -> bool: ...
    def recover(self) -> list[str]: ...
    def get(self, job_id: str) -> Job | None: ...
    def list(self, study_uid: str | None = None, state: str | None = None, limit: int = 100) -> list[Job]: ...
    def cursor(self, name: str) -> int | None: ...
    def set_cursor(self, name: str, value: int) -> None: ...
    def poller_lock(self) -> HeldLock | None: ...


class FileLock:
    """An exclusive `flock` on a file, held as long as this object is open (and gone with its process)."""

    def __init__(self, handle: IO[str]) -> None:
        self.handle = handle

    def held(self) -> bool:
        return not self.handle.closed

    def close(self) -> None:
        self.handle.close()


def hold_lock(path: Path) -> FileLock | None:
    """An exclusive lock on `path` (e.g. one `/changes` poller per server), or None when another worker holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "w")  # noqa: SIM115 - held open as long as the lock
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return FileLock(handle)


class JobStore:
    """Job rows in one SQLite file; every method opens its own short connection (safe across worker processes).
    The embedded backend of `PacsJobs`: one machine, leases by process id."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.results_dir = self.path.parent / "results"
        with self._connect() as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(_SCHEMA)
        with self._transaction() as connection:
            columns = {row["name"] for row in connection.execute("PRAGMA table_info(pacs_jobs)")}
            if "priority" not in columns:  # a file from before job priorities: its jobs are routine
                connection.execute("ALTER TABLE pacs_jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")
            if "attempt" not in columns:  # a queue written before attempts were counted
                connection.execute("ALTER TABLE pacs_jobs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        connection.row_factory = sqlite3.Row
        try:
            yield connection
        finally:
            connection.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def add(self, study_uid: str, model_id: str | None, model_version: str | None, series: dict[str, str],
            state: JobState = "queued", reason: str | None = None, priority: Priority = ROUTINE) -> tuple[str, bool]:
        """(job id, whether it is new): the job with this key, created unless it exists (an existing job keeps its
        priority)."""
        key = idempotency_key(study_uid, series, model_version if state != "skipped" else reason)
        now = time.time()
        with self._transaction() as connection:
            row = connection.execute("SELECT job_id FROM pacs_jobs WHERE idempotency_key = ?", (key,)).fetchone()
            if row is not None:
                return row["job_id"], False
            job_id = uuid.uuid4().hex
            message = reason if state == "skipped" else (f"queued ({priority}): {model_id} {model_version} on "
                                                         f"{len(series)} series")
            connection.execute(
                "INSERT INTO pacs_jobs (job_id, idempotency_key, study_uid, model_id, model_version, series_json, "
                "state, reason, priority, log_json, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, key, study_uid, model_id, model_version, json.dumps(series), state, reason, RANK[priority],
                 json.dumps([_entry(now, message)]), now, now),
            )
        return job_id, True

    def notice(self, study_uid: str) -> None:
        """Queue a stable-study notification (a pending one for the study is refreshed, not doubled)."""
        with self._connect() as connection:
            connection.execute(
                "INSERT INTO pacs_notices (study_uid, received_at) VALUES (?, ?) ON CONFLICT(study_uid) DO UPDATE "
                "SET received_at = excluded.received_at, not_before = 0", (study_uid, time.time()))

    def claim_notice(self) -> tuple[str, float] | None:
        """Lease the oldest due notification: (StudyInstanceUID, when it was received)."""
        now = time.time()
        with self._transaction() as connection:
            rows = connection.execute("SELECT study_uid, received_at, lease_pid FROM pacs_notices "
                                      "WHERE not_before <= ? ORDER BY received_at", (now,)).fetchall()
            for row in rows:
                if row["lease_pid"] is not None and _pid_alive(row["lease_pid"]):
                    continue
                connection.execute("UPDATE pacs_notices SET lease_pid = ? WHERE study_uid = ?",
                                   (os.getpid(), row["study_uid"]))
                return row["study_uid"], row["received_at"]
        return None

    def notice_handled(self, study_uid: str, received_at: float) -> None:
        """Drop a handled notification, unless the study was notified again meanwhile (then it is handled again)."""
        with self._transaction() as connection:
            connection.execute("DELETE FROM pacs_notices WHERE study_uid = ? AND received_at = ?",
                               (study_uid, received_at))
            connection.execute("UPDATE pacs_notices SET lease_pid = NULL WHERE study_uid = ?", (study_uid,))

    def notice_failed(self, study_uid: str, delay_s: float) -> int:
        """Try the notification again in `delay_s` (the PACS did not answer); how often it failed so far."""
        with self._transaction() as connection:
            connection.execute("UPDATE pacs_notices SET failures = failures + 1, not_before = ?, lease_pid = NULL "
                               "WHERE study_uid = ?", (time.time() + delay_s, study_uid))
            row = connection.execute("SELECT failures FROM pacs_notices WHERE study_uid = ?", (study_uid,)).fetchone()
        return 0 if row is None else int(row["failures"])

    def notice_failures(self, study_uid: str) -> int:
        with self._connect() as connection:
            row = connection.execute("SELECT failures FROM pacs_notices WHERE study_uid = ?", (study_uid,)).fetchone()
        return 0 if row is None else int(row["failures"])

    def claim(self) -> Lease | None:
        """Lease the first due job to this process, urgent before routine, then the oldest: queued (it starts running:
        its runs counter goes up), exporting, or running under a worker process that is gone (it runs again, unless it
        already ran `MAX_RUNS` times). The claim takes the job's next attempt number."""
        now = time.time()
        with self._transaction() as connection:
            rows = connection.execute(
                "SELECT job_id, state, lease_pid, runs FROM pacs_jobs WHERE state IN ('queued', 'exporting', 'running') "
                "AND not_before <= ? ORDER BY priority DESC, created_at", (now,)).fetchall()
            for row in rows:
                if row["lease_pid"] is not None and _pid_alive(row["lease_pid"]):
                    continue
                if row["state"] == "running":
                    if row["runs"] >= MAX_RUNS:
                        self._set(connection, row["job_id"], now, "failed: its worker ended mid-run twice",
                                  state="failed", reason="interrupted twice", lease_pid=None)
                        continue
                    self._set(connection, row["job_id"], now, "its worker ended mid-run: running it again")
                started = ", state = 'running', runs = runs + 1" if row["state"] in ("queued", "running") else ""
                attempt = connection.execute(
                    f"UPDATE pacs_jobs SET lease_pid = ?, attempt = attempt + 1, updated_at = ?{started} "
                    "WHERE job_id = ? RETURNING attempt", (os.getpid(), now, row["job_id"])).fetchone()["attempt"]
                job = self._job(connection, row["job_id"])
                assert job is not None
                return Lease(job, attempt)
        return None

    def keep_alive(self, lease: Lease) -> AbstractContextManager[None]:
        """Nothing to renew: a process id lease lasts as long as its process."""
        return nullcontext()

    def renew(self, lease: Lease) -> bool:
        """Whether the run still holds its job (a process id lease needs no renewal)."""
        with self._connect() as connection:
            row = connection.execute("SELECT 1 FROM pacs_jobs WHERE job_id = ? AND attempt = ? AND state IN (?, ?)",
                                     (lease.job_id, lease.attempt, *ACTIVE_STATES)).fetchone()
        return row is not None

    def log(self, lease: Lease, message: str) -> bool:
        return self._update(lease, message)

    def ready_to_export(self, lease: Lease, message: str) -> bool:
        """The result files are written: from now on a restart re-sends them instead of recomputing."""
        return self._update(lease, message, state="exporting")

    def export_failed(self, lease: Lease, message: str, delay_s: float) -> bool:
        """Release the job for another export attempt in `delay_s`."""
        return self._update(lease, f"{message}; next attempt in {delay_s:.1f} s", lease_pid=None,
                            not_before=time.time() + delay_s, export_failures=("export_failures + 1",))

    def retry_later(self, lease: Lease, message: str, delay_s: float) -> bool:
        """Put a job that could not read its series back in the queue (the run does not count)."""
        return self._update(lease, f"{message}; next attempt in {delay_s:.1f} s", state="queued", lease_pid=None,
                            not_before=time.time() + delay_s, runs=("runs - 1",))

    def done(self, lease: Lease, results: Sequence[dict[str, str]], message: str) -> bool:
        return self._update(lease, message, state="done", lease_pid=None, results_json=json.dumps(list(results)))

    def fail(self, lease: Lease, reason: str) -> bool:
        return self._update(lease, f"failed: {reason}", state="failed", reason=reason, lease_pid=None)

    def recover(self) -> list[str]:
        """At start-up, before any worker runs: free every lease; a job caught running runs again, or fails when it
        already ran twice. The ids of the jobs put back."""
        now = time.time()
        requeued = []
        with self._transaction() as connection:
            for row in connection.execute("SELECT job_id, runs FROM pacs_jobs WHERE state = 'running'").fetchall():
                if row["runs"] >= MAX_RUNS:
                    self._set(connection, row["job_id"], now, "failed: interrupted by a restart twice", state="failed",
                              reason="interrupted twice", lease_pid=None)
                else:
                    self._set(connection, row["job_id"], now, "interrupted by a restart: queued to run again",
                              state="queued", lease_pid=None, not_before=0)
                    requeued.append(row["job_id"])
            connection.execute("UPDATE pacs_jobs SET lease_pid = NULL WHERE lease_pid IS NOT NULL")
            connection.execute("UPDATE pacs_notices SET lease_pid = NULL WHERE lease_pid IS NOT NULL")
        return requeued

    def get(self, job_id: str) -> Job | None:
        with self._connect() as connection:
            return self._job(connection, job_id)

    def list(self, study_uid: str | None = None, state: str | None = None, limit: int = 100) -> list[Job]:
        query, args = "SELECT job_id FROM pacs_jobs WHERE 1 = 1", []
        if study_uid is not None:
            query, args = query + " AND study_uid = ?", [*args, study_uid]
        if state is not None:
            query, args = query + " AND state = ?", [*args, state]
        with self._connect() as connection:
            ids = [row["job_id"] for row in connection.execute(f"{query} ORDER BY created_at DESC LIMIT ?",
                                                                 (*args, limit))]
            return [job for job in (self._job(connection, job_id) for job_id in ids) if job is not None]

    def cursor(self, name: str) -> int | None:
        """Where a poller stopped (e.g. the last Orthanc change it handled), or None before its first poll."""
        with self._connect() as connection:
            row = connection.execute("SELECT value FROM pacs_cursors WHERE name = ?", (name,)).fetchone()
        return None if row is None else int(row["value"])

    def set_cursor(self, name: str, value: int) -> None:
        with self._connect() as connection:
            connection.execute("INSERT INTO pacs_cursors (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE "
                               "SET value = excluded.value", (name, value))

    def poller_lock(self) -> FileLock | None:
        """The `/changes` poller's lock: a file lock beside the queue (one poller per server)."""
        return hold_lock(self.path.parent / "poller.lock")

    def _update(self, lease: Lease, message: str, **fields: Any) -> bool:
        with self._transaction() as connection:
            return self._set(connection, lease.job_id, time.time(), message, attempt=lease.attempt, **fields)

    @staticmethod
    def _set(connection: sqlite3.Connection, job_id: str, now: float, message: str, attempt: int | None = None,
             **fields: Any) -> bool:
        """Append `message` to the job's log and set `fields` (a value, or a 1-tuple holding an SQL expression); with
        `attempt`, only while that attempt runs the job. Whether the job was changed."""
        fence, fenced = ("", ()) if attempt is None else (" AND attempt = ? AND state IN (?, ?)",
                                                           (attempt, *ACTIVE_STATES))
        row = connection.execute(f"SELECT log_json FROM pacs_jobs WHERE job_id = ?{fence}", (job_id, *fenced)).fetchone()
        if row is None:
            return False
        entries = [*json.loads(row["log_json"]), _entry(now, message)]
        fields = {**fields, "log_json": json.dumps(entries), "updated_at": now}
        assignments = ", ".join(f"{name} = {value[0]}" if isinstance(value, tuple) else f"{name} = ?"
                                for name, value in fields.items())
        values = [value for value in fields.values() if not isinstance(value, tuple)]
        connection.execute(f"UPDATE pacs_jobs SET {assignments} WHERE job_id = ?", (*values, job_id))
        return True

    @staticmethod
    def _job(connection: sqlite3.Connection, job_id: str) -> Job | None:
        row = connection.execute("SELECT * FROM pacs_jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        return Job(job_id=row["job_id"], study_instance_uid=row["study_uid"], model_id=row["model_id"],
                   model_version=row["model_version"], series=json.loads(row["series_json"]),
                   priority=priority_of(row["priority"]), state=row["state"],
                   reason=row["reason"], runs=row["runs"], export_failures=row["export_failures"],
                   results=json.loads(row["results_json"]) if row["results_json"] else None,
                   log=json.loads(row["log_json"]), created_at=iso(row["created_at"]),
                   updated_at=iso(row["updated_at"]))


def _entry(now: float, message: str) -> dict[str, str]:
    return {"at": iso(now), "message": message}


def job_store_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / "pacs" / "jobs.sqlite3"


class Notice(BaseModel):
    """`POST /pacs/notify`: a study became stable in the PACS (what Orthanc's `OnStableStudy` sends)."""

    study_instance_uid: str = Field(pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64)
    orthanc_study_id: str | None = Field(default=None, max_length=64, description="informational")


class Notified(BaseModel):
    """A notification accepted: a worker searches the study and queues its jobs (`GET /pacs/jobs?study_instance_uid=`).
    The route never calls the PACS back: Orthanc's Lua waits for the answer, holding its REST API."""

    study_instance_uid: str
    queued: bool = True
