"""PACS jobs on the replicas' PostgreSQL (distributed mode): the `state.pacs_jobs.PacsJobs` interface for every replica.

Any replica may receive a notification, resolve it and run or export any job:
- **Once per study**: the idempotency key is UNIQUE, and `add` is one `INSERT … ON CONFLICT DO NOTHING`, so two
  replicas resolving the same study at once find one job.
- **Claims** take the first due job (`ORDER BY priority DESC, created_at`) with `FOR UPDATE SKIP LOCKED`: two workers
  never claim one job, and neither waits for the other.
- **Leases** are a holder (`<replica>/<pid>`) and an expiry on the database's clock, renewed by a heartbeat thread
  while the job runs (`keep_alive`), so a stalled event loop cannot lose it. A job whose lease expired (its replica
  killed, frozen or cut off) is claimed by another worker as a new run: running, it runs again (counted: a job
  interrupted twice fails, `MAX_RUNS`); exporting, it sends its files again.
- **Fencing**: each claim takes the job's next attempt number and every write of the run is made `WHERE attempt =
  <its attempt>`: a superseded run (a frozen replica resumed) changes nothing, and finds out before it sends
  anything to the PACS (`renew`).
- Notifications, the `/changes` cursor and the poller's leadership (a session advisory lock held by a dedicated
  connection) live here too. Result files are on the shared volume, `<shared_dir>/pacs/results/<job id>`.

Every call borrows a connection of this process's pool (`state.shared_db.connection`: the replica's connection budget);
the poller's lock holds one connection of its own. Tables are created once under an advisory lock.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from core.priority import RANK, ROUTINE, Priority, priority_of
from state import shared_db
from state.pacs_jobs import ACTIVE_STATES, MAX_RUNS, Job, JobState, Lease, idempotency_key, iso

log = logging.getLogger("neuronova.pacs")

JOBS, NOTICES, CURSORS = "neuronova_pacs_jobs", "neuronova_pacs_notices", "neuronova_pacs_cursors"
SCHEMA_LOCK = 0x4E4E_5041  # pg_advisory_xact_lock key: replicas starting together create the tables once
POLLER_LOCK = 0x4E4E_5043  # pg_try_advisory_lock key: the one `/changes` poller of all replicas
LEASE_S = 15.0
"""A job's lease lasts this long unless renewed; renewed every `LEASE_S / 5` while the job runs."""
NOTICE_LEASE_S = 60.0
"""A notification being resolved (a QIDO-RS search and the series selection) is another worker's after this."""
_NOW = "extract(epoch from clock_timestamp())"
_LOG = ("log = log || jsonb_build_array(jsonb_build_object('at', to_char(clock_timestamp() AT TIME ZONE 'UTC', "
        "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"'), 'message', %(message)s::text))")
"""Append `message` to the job's log, stamped on the database's clock as `state.pacs_jobs.iso` writes times."""
_FENCE = f"job_id = %(job_id)s AND attempt = %(attempt)s AND state IN {ACTIVE_STATES!r}"
"""Which row a write of a run may change: its job, while its attempt holds it."""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {JOBS} (
    job_id text PRIMARY KEY,
    idempotency_key text UNIQUE NOT NULL,
    study_uid text NOT NULL,
    model_id text,
    model_version text,
    series jsonb NOT NULL,
    state text NOT NULL,
    reason text,
    priority integer NOT NULL DEFAULT 0,
    runs integer NOT NULL DEFAULT 0,
    attempt integer NOT NULL DEFAULT 0,
    export_failures integer NOT NULL DEFAULT 0,
    not_before double precision NOT NULL DEFAULT 0,
    lease_owner text,
    lease_expires double precision,
    results jsonb,
    log jsonb NOT NULL DEFAULT '[]',
    created_at double precision NOT NULL,
    updated_at double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS {JOBS}_due ON {JOBS} (priority DESC, created_at) WHERE state IN ('queued', 'running', 'exporting');
CREATE INDEX IF NOT EXISTS {JOBS}_study ON {JOBS} (study_uid);
CREATE TABLE IF NOT EXISTS {NOTICES} (
    study_uid text PRIMARY KEY,
    received_at double precision NOT NULL,
    not_before double precision NOT NULL DEFAULT 0,
    failures integer NOT NULL DEFAULT 0,
    lease_owner text,
    lease_expires double precision
);
CREATE TABLE IF NOT EXISTS {CURSORS} (name text PRIMARY KEY, value bigint NOT NULL)
"""


class PostgresJobStore:
    """PACS job rows in PostgreSQL, shared by every replica; the distributed backend of `state.pacs_jobs.PacsJobs`."""

    def __init__(self, database_url: str, shared_dir: str | Path, replica: str | None,
                 lease_s: float = LEASE_S) -> None:
        self.database_url = database_url
        self.results_dir = Path(shared_dir) / "pacs" / "results"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.replica = replica
        """The configured replica id (`distributed.replica_id`), which `recover` needs; None: the host name."""
        self.lease_s = lease_s
        with self._connect() as connection:
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            connection.execute(_SCHEMA)

    @property
    def owner(self) -> str:
        """This worker's name on its leases: the replica and the process."""
        return f"{self.replica or socket.gethostname()}/{os.getpid()}"

    @contextmanager
    def _connect(self) -> Iterator[psycopg.Connection]:
        with shared_db.connection(self.database_url) as connection:
            yield connection

    def add(self, study_uid: str, model_id: str | None, model_version: str | None, series: dict[str, str],
            state: JobState = "queued", reason: str | None = None, priority: Priority = ROUTINE) -> tuple[str, bool]:
        """(job id, whether it is new): the job with this key, created unless it exists (on any replica); urgent jobs
        are claimed before routine ones."""
        key = idempotency_key(study_uid, series, model_version if state != "skipped" else reason)
        message = reason if state == "skipped" else (f"queued ({priority}): {model_id} {model_version} on "
                                                     f"{len(series)} series")
        with self._connect() as connection:
            made = connection.execute(
                f"INSERT INTO {JOBS} (job_id, idempotency_key, study_uid, model_id, model_version, series, state, "
                f"reason, priority, created_at, updated_at) VALUES (%(job_id)s, %(key)s, %(study)s, %(model)s, "
                f"%(version)s, %(series)s, %(state)s, %(reason)s, %(priority)s, {_NOW}, {_NOW}) "
                "ON CONFLICT (idempotency_key) DO NOTHING RETURNING job_id",
                {"job_id": uuid.uuid4().hex, "key": key, "study": study_uid, "model": model_id, "version": model_version, "series": Jsonb(series),
                 "state": state, "reason": reason, "priority": RANK[priority]}).fetchone()
            if made is None:
                return connection.execute(f"SELECT job_id FROM {JOBS} WHERE idempotency_key = %s",
                                          (key,)).fetchone()["job_id"], False
            connection.execute(f"UPDATE {JOBS} SET {_LOG} WHERE job_id = %(job_id)s",
                               {"message": message, "job_id": made["job_id"]})
        return made["job_id"], True

    def notice(self, study_uid: str) -> None:
        """Queue a stable-study notification (a pending one for the study is refreshed, not doubled)."""
        with self._connect() as connection:
            connection.execute(
                f"INSERT INTO {NOTICES} (study_uid, received_at) VALUES (%s, {_NOW}) ON CONFLICT (study_uid) DO UPDATE "
                "SET received_at = EXCLUDED.received_at, not_before = 0", (study_uid,))

    def claim_notice(self) -> tuple[str, float] | None:
        """Lease the oldest due notification no live lease holds: (StudyInstanceUID, when it was received)."""
        with self._connect() as connection:
            row = connection.execute(
                f"UPDATE {NOTICES} SET lease_owner = %(owner)s, lease_expires = {_NOW} + %(lease)s WHERE study_uid = ("
                f"SELECT study_uid FROM {NOTICES} WHERE not_before <= {_NOW} AND "
                f"(lease_expires IS NULL OR lease_expires < {_NOW}) ORDER BY received_at LIMIT 1 FOR UPDATE SKIP LOCKED"
                ") RETURNING study_uid, received_at", {"owner": self.owner, "lease": NOTICE_LEASE_S}).fetchone()
        return None if row is None else (row["study_uid"], row["received_at"])

    def notice_handled(self, study_uid: str, received_at: float) -> None:
        """Drop a handled notification, unless the study was notified again meanwhile (then it is handled again)."""
        with self._connect() as connection:
            connection.execute(f"DELETE FROM {NOTICES} WHERE study_uid = %s AND received_at = %s",
                               (study_uid, received_at))
            connection.execute(f"UPDATE {NOTICES} SET lease_owner = NULL, lease_expires = NULL WHERE study_uid = %s",
                               (study_uid,))

    def notice_failed(self, study_uid: str, delay_s: float) -> int:
        """Try the notification again in `delay_s` (the PACS did not answer); how often it failed so far."""
        with self._connect() as connection:
            row = connection.execute(
                f"UPDATE {NOTICES} SET failures = failures + 1, not_before = {_NOW} + %s, lease_owner = NULL, "
                "lease_expires = NULL WHERE study_uid = %s RETURNING failures", (delay_s, study_uid)).fetchone()
        return 0 if row is None else int(row["failures"])

    def notice_failures(self, study_uid: str) -> int:
        with self._connect() as connection:
            row = connection.execute(f"SELECT failures FROM {NOTICES} WHERE study_uid = %s", (study_uid,)).fetchone()
        return 0 if row is None else int(row["failures"])

    def claim(self) -> Lease | None:
        """Lease the first due job to this worker, urgent first, then first in: queued (it starts running, its runs
        counter goes up), exporting and not leased, or leased with an expired lease (a running one runs again unless
        it already ran `MAX_RUNS` times: then it fails). The claim takes the job's next attempt number."""
        with self._connect() as connection:
            expired = f"state IN {ACTIVE_STATES!r} AND (lease_expires IS NULL OR lease_expires < {_NOW})"
            connection.execute(
                f"UPDATE {JOBS} SET state = 'failed', reason = 'interrupted twice', lease_owner = NULL, "
                f"lease_expires = NULL, updated_at = {_NOW}, {_LOG} WHERE state = 'running' AND runs >= %(max)s "
                f"AND lease_expires < {_NOW}", {"max": MAX_RUNS, "message": "failed: its lease expired mid-run twice"})
            row = connection.execute(
                f"SELECT job_id, state, lease_owner FROM {JOBS} WHERE not_before <= {_NOW} AND "
                f"(state = 'queued' OR {expired}) ORDER BY priority DESC, created_at LIMIT 1 FOR UPDATE SKIP LOCKED"
            ).fetchone()
            if row is None:
                return None
            message = None
            if row["lease_owner"] is not None:  # taken over: its holder stopped renewing
                again = "running it again" if row["state"] == "running" else "exporting again"
                message = f"the lease of {row['lease_owner']} expired: {again} here ({self.owner})"
            claimed = connection.execute(
                f"UPDATE {JOBS} SET attempt = attempt + 1, lease_owner = %(owner)s, "
                f"lease_expires = {_NOW} + %(lease)s, updated_at = {_NOW}, "
                "runs = CASE WHEN state = 'exporting' THEN runs ELSE runs + 1 END, "
                "state = CASE WHEN state = 'exporting' THEN 'exporting' ELSE 'running' END"
                + (f", {_LOG}" if message else "") + " WHERE job_id = %(job_id)s RETURNING *",
                {"owner": self.owner, "lease": self.lease_s, "job_id": row["job_id"], "message": message}).fetchone()
        return Lease(_job(claimed), claimed["attempt"])

    @contextmanager
    def keep_alive(self, lease: Lease) -> Iterator[None]:
        """Renew the lease from a thread every `lease_s / 5` while the block runs (a blocked event loop does not
        stop it; a frozen or killed process does, and another replica takes the job over)."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.lease_s / 5):
                try:
                    if not self.renew(lease) and not stop.is_set():
                        log.warning("pacs: job %s was taken over (attempt %d superseded): its writes are refused",
                                    lease.job_id, lease.attempt)
                        return
                except psycopg.Error as exc:  # the database unreachable for a beat: the next one tries again
                    log.warning("pacs: lease renewal of job %s failed: %s", lease.job_id, type(exc).__name__)

        threading.Thread(target=beat, name=f"pacs-lease-{lease.job_id[:8]}", daemon=True).start()
        try:
            yield
        finally:
            stop.set()  # not joined: a beat in flight ends on its own, its answer ignored

    def renew(self, lease: Lease) -> bool:
        """Extend the run's lease; False when the run no longer holds its job (taken over, or finished)."""
        return self._update(lease, f"lease_expires = {_NOW} + %(lease)s", {"lease": self.lease_s}, None)

    def log(self, lease: Lease, message: str) -> bool:
        return self._update(lease, "", {}, message)

    def ready_to_export(self, lease: Lease, message: str) -> bool:
        """The result files are written: from now on a takeover re-sends them instead of recomputing."""
        return self._update(lease, "state = 'exporting'", {}, message)

    def export_failed(self, lease: Lease, message: str, delay_s: float) -> bool:
        """Release the job for another export attempt in `delay_s` (by any replica)."""
        return self._update(lease, f"export_failures = export_failures + 1, not_before = {_NOW} + %(delay)s, "
                            "lease_owner = NULL, lease_expires = NULL", {"delay": delay_s},
                            f"{message}; next attempt in {delay_s:.1f} s")

    def retry_later(self, lease: Lease, message: str, delay_s: float) -> bool:
        """Put a job that could not read its series back in the queue (the run does not count)."""
        return self._update(lease, f"state = 'queued', runs = runs - 1, not_before = {_NOW} + %(delay)s, "
                            "lease_owner = NULL, lease_expires = NULL", {"delay": delay_s},
                            f"{message}; next attempt in {delay_s:.1f} s")

    def done(self, lease: Lease, results: Sequence[dict[str, str]], message: str) -> bool:
        return self._update(lease, "state = 'done', results = %(results)s, lease_owner = NULL, lease_expires = NULL",
                            {"results": Jsonb(list(results))}, message)

    def fail(self, lease: Lease, reason: str) -> bool:
        return self._update(lease, "state = 'failed', reason = %(reason)s, lease_owner = NULL, lease_expires = NULL",
                            {"reason": reason}, f"failed: {reason}")

    def recover(self) -> list[str]:
        """At this replica's start, before its workers: the jobs its previous run held (by its configured replica id)
        are freed at once rather than when their leases expire: a job caught running is queued to run again (or
        fails, interrupted twice), one caught exporting is free to export. Other replicas' jobs are left alone; without
        a configured replica id nothing is known to be ours, and the leases expire. The ids of the jobs put back."""
        if self.replica is None:
            return []
        mine = {"prefix": f"{self.replica}/", "max": MAX_RUNS}
        with self._connect() as connection:
            connection.execute(
                f"UPDATE {JOBS} SET state = 'failed', reason = 'interrupted twice', lease_owner = NULL, "
                f"lease_expires = NULL, updated_at = {_NOW}, {_LOG} WHERE state = 'running' AND runs >= %(max)s "
                "AND starts_with(lease_owner, %(prefix)s)", {**mine, "message": "failed: interrupted by a restart twice"})
            requeued = connection.execute(
                f"UPDATE {JOBS} SET state = 'queued', not_before = 0, lease_owner = NULL, lease_expires = NULL, "
                f"updated_at = {_NOW}, {_LOG} WHERE state = 'running' AND starts_with(lease_owner, %(prefix)s) "
                "RETURNING job_id", {**mine, "message": "interrupted by a restart: queued to run again"}).fetchall()
            connection.execute(f"UPDATE {JOBS} SET lease_owner = NULL, lease_expires = NULL WHERE state = 'exporting' "
                               "AND starts_with(lease_owner, %(prefix)s)", mine)
            connection.execute(f"UPDATE {NOTICES} SET lease_owner = NULL, lease_expires = NULL "
                               "WHERE starts_with(lease_owner, %(prefix)s)", mine)
        return [row["job_id"] for row in requeued]

    def get(self, job_id: str) -> Job | None:
        with self._connect() as connection:
            row = connection.execute(f"SELECT * FROM {JOBS} WHERE job_id = %s", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def list(self, study_uid: str | None = None, state: str | None = None, limit: int = 100) -> list[Job]:
        with self._connect() as connection:
            rows = connection.execute(
                f"SELECT * FROM {JOBS} WHERE (%(study)s::text IS NULL OR study_uid = %(study)s) AND "
                "(%(state)s::text IS NULL OR state = %(state)s) ORDER BY created_at DESC LIMIT %(limit)s",
                {"study": study_uid, "state": state, "limit": limit}).fetchall()
        return [_job(row) for row in rows]

    def cursor(self, name: str) -> int | None:
        """Where the poller stopped (the last Orthanc change it handled), or None before its first poll."""
        with self._connect() as connection:
            row = connection.execute(f"SELECT value FROM {CURSORS} WHERE name = %s", (name,)).fetchone()
        return None if row is None else int(row["value"])

    def set_cursor(self, name: str, value: int) -> None:
        with self._connect() as connection:
            connection.execute(f"INSERT INTO {CURSORS} (name, value) VALUES (%s, %s) ON CONFLICT (name) DO UPDATE "
                               "SET value = EXCLUDED.value", (name, value))

    def poller_lock(self) -> AdvisoryLock | None:
        """The `/changes` poller's leadership across replicas, or None while another worker holds it."""
        return AdvisoryLock.try_hold(self.database_url, POLLER_LOCK)

    def _update(self, lease: Lease, assignments: str, values: dict[str, Any], message: str | None) -> bool:
        """One fenced write of a run: `assignments` (and, with a `message`, that message appended to the log) only
        while its attempt holds the job. Whether the job was changed."""
        parts = [assignments] if assignments else []
        if message is not None:
            parts += [f"updated_at = {_NOW}", _LOG]
        with self._connect() as connection:
            done = connection.execute(
                f"UPDATE {JOBS} SET {', '.join(parts)} WHERE {_FENCE}",
                {**values, "message": message, "job_id": lease.job_id, "attempt": lease.attempt})
        return done.rowcount == 1


class AdvisoryLock:
    """A session-level advisory lock held by a connection of its own: released when closed, or when the connection
    or its process dies (then another replica's poller takes over)."""

    def __init__(self, connection: psycopg.Connection) -> None:
        self.connection = connection

    @classmethod
    def try_hold(cls, database_url: str, key: int) -> AdvisoryLock | None:
        connection = psycopg.connect(database_url, autocommit=True, **shared_db.libpq_options())
        if connection.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
            return cls(connection)
        connection.close()
        return None

    def held(self) -> bool:
        """Whether the lock's connection is still alive (a lost connection has lost the lock)."""
        try:
            self.connection.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def close(self) -> None:
        self.connection.close()


def _job(row: dict[str, Any]) -> Job:
    return Job(job_id=row["job_id"], study_instance_uid=row["study_uid"], model_id=row["model_id"],
               model_version=row["model_version"], series=row["series"], state=row["state"], reason=row["reason"],
               runs=row["runs"], export_failures=row["export_failures"], results=row["results"], log=row["log"],
               priority=priority_of(row["priority"]), created_at=iso(row["created_at"]),
               updated_at=iso(row["updated_at"]))
