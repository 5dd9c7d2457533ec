"""The durable PACS job queue: one SQLite file under the data directory, shared by every API worker.

A job is one model run on the series selected from one study. Its idempotency key (StudyInstanceUID + the selected
SeriesInstanceUIDs + the exact model version) is unique, so a repeated notification, or the PACS's stable-study event
firing again once our results land, finds the job it already made and makes none. A study that matched no rule is
kept as a `skipped` row whose reason says so.

Jobs start urgent first (a model rule's `priority`), then in the order they were created.

States: queued -> running (retrieve, infer, build the result objects, write them to the job's folder) -> exporting
(STOW-RS, retried with backoff while the PACS is unreachable) -> done; or failed, or skipped. A worker leases a job
by its process id; a lease whose process is gone is free again. After a restart (`recover`) a job caught running
runs again, once: a job interrupted twice fails. A job caught exporting sends the same files again (same UIDs), so
the PACS never holds two result sets. No patient name or id is kept: job rows hold UIDs, model names, states and
messages only.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from core.priority import RANK, ROUTINE, Priority, priority_of
from state.tasks import _pid_alive

JobState = Literal["queued", "running", "exporting", "done", "failed", "skipped"]
MAX_RUNS = 2
"""A job runs at most twice: once, and once more after a restart caught it running."""
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


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


class JobStore:
    """Job rows in one SQLite file; every method opens its own short connection (safe across worker processes)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._connect() as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(_SCHEMA)
        with self._transaction() as connection:
            columns = {row["name"] for row in connection.execute("PRAGMA table_info(pacs_jobs)")}
            if "priority" not in columns:  # a file from before job priorities: its jobs are routine
                connection.execute("ALTER TABLE pacs_jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")

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

    def claim(self) -> Job | None:
        """Lease the first due job to this process, urgent before routine, then the oldest: queued (it starts running:
        its runs counter goes up), exporting, or running under a worker process that is gone (it runs again, unless it
        already ran `MAX_RUNS` times)."""
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
                if row["state"] in ("queued", "running"):
                    connection.execute("UPDATE pacs_jobs SET state = 'running', runs = runs + 1, lease_pid = ?, "
                                       "updated_at = ? WHERE job_id = ?", (os.getpid(), now, row["job_id"]))
                else:
                    connection.execute("UPDATE pacs_jobs SET lease_pid = ?, updated_at = ? WHERE job_id = ?",
                                       (os.getpid(), now, row["job_id"]))
                return self._job(connection, row["job_id"])
        return None

    def log(self, job_id: str, message: str) -> None:
        self._update(job_id, message)

    def ready_to_export(self, job_id: str, message: str) -> None:
        """The result files are written: from now on a restart re-sends them instead of recomputing."""
        self._update(job_id, message, state="exporting")

    def export_failed(self, job_id: str, message: str, delay_s: float) -> None:
        """Release the job for another export attempt in `delay_s`."""
        with self._transaction() as connection:
            connection.execute("UPDATE pacs_jobs SET export_failures = export_failures + 1 WHERE job_id = ?", (job_id,))
        self._update(job_id, f"{message}; next attempt in {delay_s:.1f} s", lease_pid=None,
                     not_before=time.time() + delay_s)

    def retry_later(self, job_id: str, message: str, delay_s: float) -> None:
        """Put a job that could not read its series back in the queue (the run does not count)."""
        with self._transaction() as connection:
            connection.execute("UPDATE pacs_jobs SET runs = runs - 1 WHERE job_id = ?", (job_id,))
        self._update(job_id, f"{message}; next attempt in {delay_s:.1f} s", state="queued", lease_pid=None,
                     not_before=time.time() + delay_s)

    def done(self, job_id: str, results: Sequence[dict[str, str]], message: str) -> None:
        self._update(job_id, message, state="done", lease_pid=None, results_json=json.dumps(list(results)))

    def fail(self, job_id: str, reason: str) -> None:
        self._update(job_id, f"failed: {reason}", state="failed", reason=reason, lease_pid=None)

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

    def _update(self, job_id: str, message: str, **fields: Any) -> None:
        with self._transaction() as connection:
            self._set(connection, job_id, time.time(), message, **fields)

    @staticmethod
    def _set(connection: sqlite3.Connection, job_id: str, now: float, message: str, **fields: Any) -> None:
        row = connection.execute("SELECT log_json FROM pacs_jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            return
        entries = [*json.loads(row["log_json"]), _entry(now, message)]
        fields = {**fields, "log_json": json.dumps(entries), "updated_at": now}
        assignments = ", ".join(f"{name} = ?" for name in fields)
        connection.execute(f"UPDATE pacs_jobs SET {assignments} WHERE job_id = ?", (*fields.values(), job_id))

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
                   log=json.loads(row["log_json"]), created_at=_iso(row["created_at"]),
                   updated_at=_iso(row["updated_at"]))


def _entry(now: float, message: str) -> dict[str, str]:
    return {"at": _iso(now), "message": message}


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
