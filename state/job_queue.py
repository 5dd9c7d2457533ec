"""The MRI work queue of distributed mode: procrastinate (a maintained PostgreSQL job queue) with a worker inside every
API worker process of every replica.

Why procrastinate and not Celery on Redis: the replicas already share PostgreSQL (task state, models, rate limits,
feedback), and procrastinate needs nothing else — jobs are claimed with `SELECT … FOR UPDATE SKIP LOCKED`, woken by
LISTEN/NOTIFY with a polling fallback, workers write heartbeats, jobs of a worker without one are found and retried,
and a job is one row in the same database as the task it runs. Celery would add a broker and a result backend to run,
secure and back up, and Redis' visibility timeout redelivers long tasks while they still run.

What runs where:
- submission (any replica): the uploads are written once to the task's folder on the shared volume, the request's
  parameters to its row, and one job `neuronova.mri_segmentation(task_id)` is deferred at the task's priority (an
  urgent job is taken before every routine one waiting);
- a worker (concurrency 1 per API worker process) takes the job, starts an **attempt** of the task (the fencing token,
  `state.pg_tasks`) and runs the ordinary pipeline under it; an attempt superseded meanwhile writes nothing;
- takeover: every worker looks every `STALL_CHECK_S` for jobs held by a worker whose heartbeat is older than
  `STALLED_AFTER_S` (its replica was killed or frozen) and puts them back in the queue; the next free worker of any
  replica runs them as a new attempt;
- shutdown (SIGTERM): the worker stops taking jobs; a job still running after half the shutdown grace is aborted and
  handed back (task pending again, job retried), so another replica — or this one after its restart — runs it;
- a runner that is not serving yet (a replica starting: unreachable, not loaded, or answering 503) hands the attempt
  back too, to be retried `RETRY_WAIT_S` later, up to `MAX_RUNS` runs, rather than failing a task nothing was wrong with;
  so does a transient database or shared-volume error inside an attempt (`state.dependency_health.unreachable_dependency`);
- the database lost: procrastinate's worker stops at its first failed query; `_supervise` starts it again once the
  database answers (`state.dependency_health`), and the jobs the stopped worker held are taken over like a silent
  replica's;
- orphans: every `SWEEP_EVERY_S` one worker of the replicas sweeps the tasks that no job holds (`PostgresTaskStore.sweep`):
  each is queued again (or, after `MAX_REQUEUES`, failed with `details.reason: job_lost`), so no task stays pending
  or processing without a job for more than `ORPHAN_GRACE_S + SWEEP_EVERY_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

import procrastinate
import psycopg
from bentoml.exceptions import BentoMLException
from procrastinate.exceptions import AlreadyEnqueued
from procrastinate.schema import SchemaManager

from core.errors import ModelNotLoaded
from core.priority import RANK, ROUTINE, Priority
from state import shared_db
from state.dependency_health import unreachable_dependency
from state.pg_tasks import PostgresTaskStore
from state.tasks import split_ref, task_ref

log = logging.getLogger("neuronova.queue")

QUEUE = "neuronova-mri"
TASK_NAME = "neuronova.mri_segmentation"
HEARTBEAT_S = 2.0
STALLED_AFTER_S = 10.0
"""A worker silent this long is taken for dead: its jobs go back to the queue (takeover well within 60 s)."""
STALL_CHECK_S = 2.0
FETCH_POLL_S = 1.0
"""Polling fallback of LISTEN/NOTIFY (a notification can be missed while a listener reconnects)."""
MAX_RUNS = 20
"""How often one job may be handed back or taken over before it stays failed (a job that kills its replica)."""
RETRY_WAIT_S = 3
"""A handed-back job waits this long before its next run (a starting replica's runners get time to serve)."""
SCHEMA_LOCK = 0x4E4E_5051
JOB_TABLE = "procrastinate_jobs"
SWEEP_EVERY_S = 15.0
"""How often each worker tries to sweep orphaned tasks (one sweep at a time across the replicas)."""
ACCEPT_PATIENCE_S = 60.0
"""How long a submission already answered keeps trying to register and queue its task while the database or shared
volume is unreachable (every `WORKER_RESTART_S`): an outage shorter than this loses no accepted task; a longer one
leaves it to be failed as `never_queued` (`state.pg_tasks.QUEUEING_DEADLINE_S`)."""
WORKER_RESTART_S = 1.0
"""How long a stopped procrastinate worker waits (for the database's breaker to close) before it starts again."""

Run = Callable[[str, dict[str, Any]], Awaitable[Any]]
"""Runs one attempt: (the attempt's task reference, the request's parameters)."""


class HandedBack(BaseException):
    """An attempt stopped without finishing because its process shuts down; the job goes back to the queue. A
    BaseException, like the cancellation it often comes from, so no error mapping records it as the task's failure."""


def replica_name(configured: str | None) -> str:
    return configured or f"{socket.gethostname()}-{os.getpid()}"


def prepare_database(database_url: str) -> None:
    """Create procrastinate's tables once (replicas starting together take turns on an advisory lock). Run by the
    arbiter before it starts the workers: its one connection is closed before theirs open."""
    with psycopg.connect(database_url, autocommit=False, **shared_db.libpq_options("start")) as connection:
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        if connection.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()[0] is None:
            connection.execute(SchemaManager.get_schema())


def runner_not_serving(error: BaseException) -> bool:
    """A runner unreachable or not loaded (MODEL_NOT_LOADED), or one that answered 503 (starting, overloaded)."""
    cause = error.__cause__
    return isinstance(error, ModelNotLoaded) or (
        isinstance(cause, BentoMLException) and cause.error_code == HTTPStatus.SERVICE_UNAVAILABLE)


class MriQueue:
    """The queue as one API worker process sees it: submit jobs, run them, hand them back at shutdown."""

    def __init__(self, store: PostgresTaskStore, database_url: str, replica: str, shutdown_grace_s: float) -> None:
        self.store = store
        self.replica = replica
        self.shutdown_grace_s = shutdown_grace_s
        self.app = procrastinate.App(connector=procrastinate.PsycopgConnector(
            conninfo=database_url, min_size=shared_db.QUEUE_POOL_SIZE, max_size=shared_db.QUEUE_POOL_SIZE,
            timeout=shared_db.POOL_WAIT_S, kwargs=shared_db.libpq_options()))
        self.job = self.app.task(name=TASK_NAME, queue=QUEUE, retry=procrastinate.RetryStrategy(
            max_attempts=MAX_RUNS, wait=RETRY_WAIT_S, retry_exceptions={HandedBack}))(self._run_job)
        self.running: set[str] = set()
        self.stopping = False
        self._run: Run | None = None
        self._opened = False
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _open(self) -> None:
        if not self._opened:
            await self.app.open_async()
            self._opened = True

    async def accept(self, task_id: str, request_id: str, model_id: str, uploads: list[Path],
                     params: dict[str, Any], priority: Priority = ROUTINE) -> None:
        """Register and queue a task whose submission was answered: while the database or the shared volume cannot be
        reached, try again every `WORKER_RESTART_S` for `ACCEPT_PATIENCE_S` (its client polls meanwhile)."""
        deadline = time.monotonic() + ACCEPT_PATIENCE_S
        while True:
            try:
                await asyncio.to_thread(self.store.create, task_id, request_id, model_id)
                await self.submit(task_id, uploads, params, priority)
                return
            except Exception as exc:
                if not unreachable_dependency(exc) or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(WORKER_RESTART_S)

    async def submit(self, task_id: str, uploads: list[Path], params: dict[str, Any],
                     priority: Priority = ROUTINE) -> None:
        """Write the uploads once to the task's shared folder, record the parameters (its priority among them), queue
        the job at `priority` (procrastinate's job priority: a free worker of any replica takes the highest first,
        then the oldest; a job handed back, retried, taken over or queued again by the sweep keeps it). A `defer`
        that fails leaves a task with parameters and no job: the orphan sweep queues it later."""
        folder = self.store.task_dir(task_id) / "uploads"
        names = [f"{index}/{upload.name}" for index, upload in enumerate(uploads)]

        def write() -> None:
            with self.store.on_volume():
                for name, upload in zip(names, uploads):
                    if not (folder / name).exists():  # written whole by an earlier try (write-once files)
                        self.store.write_once(folder / name, upload.read_bytes())

        await asyncio.to_thread(write)
        await asyncio.to_thread(self.store.set_params, task_id, {**params, "uploads": names, "priority": priority})
        await self.defer(task_id, priority)

    async def defer(self, task_id: str, priority: Priority = ROUTINE) -> None:
        """Queue one job for the task at `priority` (none while one already waits: its queueing lock);
        `DependencyUnavailable` at once while the database is known unreachable, and after a failed attempt (the
        breaker tripped)."""
        self.store.database.check()
        try:
            await self._open()
            await self.job.configure(queueing_lock=task_id, priority=RANK[priority]).defer_async(task_id=task_id)
        except AlreadyEnqueued:
            log.info("task %s already has a waiting job", task_id)
        except Exception as exc:
            if unreachable_dependency(exc):
                raise self.store.database.tripped(exc) from exc
            raise

    def upload_paths(self, task_id: str, params: dict[str, Any]) -> list[Path]:
        folder = self.store.task_dir(task_id) / "uploads"
        return [folder / name for name in params["uploads"]]

    def read_upload(self, path: Path) -> bytes:
        """An upload on the shared volume; `DependencyUnavailable` while the volume fails, so the attempt is handed
        back rather than failed (a missing upload is still an error of the task)."""
        with self.store.on_volume():
            return path.read_bytes()

    async def start(self, run: Run) -> None:
        """Run jobs with `run` in this process until `stop` (and look for stalled ones)."""
        self._run, self._loop = run, asyncio.get_running_loop()
        await self._open()
        self._tasks = [
            asyncio.create_task(self._supervise(), name="neuronova-queue-worker"),
            asyncio.create_task(self._requeue_stalled(), name="neuronova-queue-stalled"),
            asyncio.create_task(self._sweep_orphans(), name="neuronova-queue-sweeper"),
        ]

    async def _supervise(self) -> None:
        """Run procrastinate's worker until `stop`; when it stops by itself — on an error (a lost database fails its
        next query) or because a side task of it failed (its heartbeat's) — start it again once the database answers.
        The jobs it held are taken over as a silent worker's."""
        while not self.stopping:
            cause = "a failed side task"
            try:
                await self.app.run_worker_async(
                    queues=[QUEUE], name=self.replica, concurrency=1, install_signal_handlers=False,
                    update_heartbeat_interval=HEARTBEAT_S, stalled_worker_timeout=STALLED_AFTER_S,
                    fetch_job_polling_interval=FETCH_POLL_S, shutdown_graceful_timeout=self.shutdown_grace_s / 2,
                    delete_jobs="successful")
            except Exception as exc:  # noqa: BLE001 - a worker that stopped is started again below
                cause = type(exc).__name__
                if unreachable_dependency(exc):  # the database down, or only this worker's connection (a restart
                    await asyncio.to_thread(self.store.database.ready)  # closed it): the breaker trips on the former

            if self.stopping:
                return
            log.warning("replica %s: queue worker stopped (%s); starting it again once the database answers",
                        self.replica, cause)
            await asyncio.sleep(WORKER_RESTART_S)
            while not self.stopping and not self.store.database.available:
                await asyncio.sleep(WORKER_RESTART_S)

    async def _sweep_orphans(self) -> None:
        """Queue again (or fail) the tasks no job holds (`PostgresTaskStore.sweep`); a failed sweep waits its turn."""
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            try:
                swept = await asyncio.to_thread(self.store.sweep, JOB_TABLE, TASK_NAME)
                for task_id in swept.requeue:
                    params = await asyncio.to_thread(self.store.params, task_id) or {}
                    await self.defer(task_id, params.get("priority", ROUTINE))
                    log.warning("replica %s queued orphaned task %s again", self.replica, task_id)
                for task_id in swept.failed:
                    log.warning("replica %s failed orphaned task %s", self.replica, task_id)
            except Exception as exc:  # noqa: BLE001 - the database may be down: the next sweep tries again
                if not unreachable_dependency(exc):
                    log.exception("sweeping orphaned tasks failed")

    def stop(self) -> None:
        """Stop taking jobs (thread-safe; from a signal handler too): the running job gets half the shutdown grace,
        then it is aborted and handed back."""
        self.stopping = True
        if self._loop is not None:
            for task in self._tasks:
                self._loop.call_soon_threadsafe(task.cancel)

    async def close(self) -> None:
        self.stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._opened:
            await self.app.close_async()
            self._opened = False

    def hand_back_running(self) -> None:
        """At the shutdown deadline (any thread): hand back what still runs here; its job, held by a worker that
        no longer beats, is put back in the queue by another replica's stalled-job check."""
        for ref in list(self.running):
            self._try_hand_back(ref)

    def _try_hand_back(self, ref: str) -> bool:
        """Hand the attempt back; False when it was no longer its to hand back, or the database cannot be reached
        (the row then stays `processing` under this attempt, and the job's next run begins a new one)."""
        try:
            return self.store.hand_back(ref)
        except Exception as exc:
            if not unreachable_dependency(exc):
                raise
            log.warning("task %s could not be handed back now (the database is unreachable)", ref)
            return False

    def guarded(self, work: Callable[[], Awaitable[Any]], ref: str) -> Callable[[], Awaitable[Any]]:
        """The attempt `ref`'s `work`, whose failure while this process shuts down (its runner gone, say), because a
        runner is not serving yet, or because the database or shared volume could not be reached, hands the task back
        instead of failing it (the last run allowed fails it)."""
        attempt = split_ref(ref)[1] or 1

        async def run() -> Any:
            try:
                return await work()
            except Exception as exc:
                transient = runner_not_serving(exc) or unreachable_dependency(exc)
                if self.stopping or (transient and attempt < MAX_RUNS):
                    raise HandedBack(str(exc)) from exc
                raise

        return run

    async def _run_job(self, task_id: str) -> None:
        """One run of the job: an attempt of the task. Stopped (shutdown, a runner not serving, the database or shared
        volume lost midway: a transient error anywhere in the attempt's store calls), the attempt is handed back and
        the job retried (`HandedBack`), never failed for it."""
        try:
            attempt = await asyncio.to_thread(self.store.begin_attempt, task_id, self.replica)
        except Exception as exc:
            if unreachable_dependency(exc):
                raise HandedBack(task_id) from exc
            raise
        if attempt is None:
            log.info("task %s has nothing left to run (finished or cancelled)", task_id)
            return
        ref = task_ref(task_id, attempt)
        self.running.add(ref)
        log.info("replica %s runs task %s (attempt %d)", self.replica, task_id, attempt)
        try:
            params = await asyncio.to_thread(self.store.params, task_id)
            assert self._run is not None and params is not None
            await self._run(ref, params)
        except (asyncio.CancelledError, HandedBack, Exception) as stopped:
            if isinstance(stopped, Exception) and not unreachable_dependency(stopped):
                raise
            handed = await asyncio.to_thread(self._try_hand_back, ref)
            log.warning("replica %s stops: task %s (attempt %d) %s", self.replica, task_id, attempt,
                        "handed back to the queue" if handed else "not handed back (no longer its, or unreachable)")
            raise HandedBack(ref) from stopped
        finally:
            self.running.discard(ref)

    async def _requeue_stalled(self) -> None:
        """Put the jobs of workers without a recent heartbeat (a replica killed or frozen) back in the queue."""
        manager = self.app.job_manager
        while True:
            await asyncio.sleep(STALL_CHECK_S)
            try:
                stalled = await manager.get_stalled_jobs(queue=QUEUE, seconds_since_heartbeat=STALLED_AFTER_S)
            except Exception as exc:  # noqa: BLE001 - the database may be restarting: try again later
                if not unreachable_dependency(exc):  # an outage is logged once, by the breakers
                    log.exception("looking for stalled jobs failed")
                continue
            for job in stalled:
                with contextlib.suppress(Exception):  # another replica retried it first
                    await manager.retry_job(job)
                    log.warning("replica %s put job %s of a silent worker back in the queue", self.replica, job.id)
