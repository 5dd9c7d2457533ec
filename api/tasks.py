"""Task plumbing around BentoML's `@bentoml.task`: our durable task state, the design's polling and cancel routes,
and keeping credentials and results of BentoML's own task store private.

BentoML 1.4 runs a task as a background job of the worker that accepted `/submit` and stores it in SQLite
(wiped at every start, kept with the whole request, cancel unsupported: docs/bentoml-pitfalls.md G4-G7). The task
body therefore records status, progress and result in `state.tasks.TaskStore` under BentoML's task id, and cancellation
is cooperative through that store's flag.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs

from bentoml._internal.configuration.containers import BentoMLContainer
from pydantic import BaseModel
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import current_owner
from api.buffered_responses import ObservedSend
from api.errors import STATUS_CODES, as_neuronova_error, error_response
from core.errors import DependencyUnavailable, InvalidRequest, NeuroNovaError, NotFound, RateLimitExceeded, error_body
from core.priority import Priority
from pipelines.priority_gate import PriorityGate
from core.settings import Settings
from state.tasks import ACTIVE, TaskCancelled, TaskStates, split_ref, visible_to
from state.stores import open_task_store

log = logging.getLogger("neuronova.tasks")
RESULT_STORE_ENV = "BENTOML_RESULT_STORE"
QUEUE_FULL_RETRY_AFTER_S = 30
T = TypeVar("T")
_BENTOML_STATUS = {"in_progress": "processing", "pending": "pending", "completed": "completed", "failed": "failed",
                   "canceled": "cancelled"}
_AS_BENTOML = {"pending": "in_progress", "processing": "in_progress", "completed": "completed", "failed": "failed",
               "cancelled": "canceled"}
"""Our statuses as BentoML's clients know them (a queued task is in progress for them: they poll on)."""


class TaskCancelledError(NeuroNovaError):
    """The body a cancelled task leaves in BentoML's store (its `get` answers 409 with this)."""

    code, status = "TASK_CANCELLED", 409


def configure_bentoml_result_store(data_dir: str | Path) -> Path:
    """Point BentoML's task store (which keeps every request body) at a private folder, unless already set."""
    folder = Path(data_dir).resolve() / "bentoml-tasks"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.environ.setdefault(RESULT_STORE_ENV, str(folder / "task_result.db"))
    return Path(os.environ[RESULT_STORE_ENV])


def current_task_id(ctx: Any) -> str:
    """BentoML's id of the task being run (set on the request by its task runner), or a new id for a direct call."""
    state = getattr(getattr(ctx, "request", None), "state", None)
    return str(getattr(state, "task_id", None) or f"task_{uuid.uuid4().hex}")


async def run_tracked(
    tasks: TaskStates, task_id: str, request_id: str, model_id: str, work: Callable[[], Awaitable[BaseModel]],
    ctx: Any = None, after_commit: Callable[[], Awaitable[None]] | None = None,
) -> BaseModel | JSONResponse:
    """Run a task body with its state kept in `tasks`: completed with the response, failed with the SPEC error body,
    or cancelled. Every exception becomes the SPEC error response, so BentoML stores it as a failed task.
    `after_commit` runs once the result is committed, never for an attempt whose (fenced) completion was refused.

    With a `bentoml.Context` BentoML answers with `ctx.response.status_code`, so an error's status is set there too.
    """
    await asyncio.to_thread(tasks.create, task_id, request_id, model_id)  # store calls off the event loop
    try:
        response = await work()
    except Exception as exc:  # noqa: BLE001 - this is the mapping point for task bodies
        if isinstance(exc, TaskCancelled) or await asyncio.to_thread(tasks.cancel_requested, task_id):
            return _error(TaskCancelledError("the task was cancelled", {"task_id": task_id}), ctx)
        error = as_neuronova_error(exc)
        log.warning("task %s failed: %s %s", task_id, error.code, error.message)
        await asyncio.to_thread(tasks.fail, task_id, error)
        return _error(error, ctx)
    # The fenced write is the one check: a run cancelled or superseded meanwhile has its result refused (and its
    # result file deleted), so it changes nothing the caller sees.
    if not await asyncio.to_thread(tasks.complete, task_id, response.model_dump(mode="json")):
        log.warning("task %s: the result of this run was refused (cancelled or superseded meanwhile)", task_id)
        return _error(TaskCancelledError("the task was cancelled", {"task_id": split_ref(task_id)[0]}), ctx)
    if after_commit is not None:
        await after_commit()
    return response


def _error(error: NeuroNovaError, ctx: Any) -> JSONResponse:
    if ctx is not None:
        ctx.response.status_code = error.status
    return error_response(error)


def task_status(tasks: TaskStates, task_id: str, subject: str) -> JSONResponse:
    """The design's polling body; tasks not (yet) in our store are read from BentoML's store, else 404 (also for
    another subject's task)."""
    if not visible_to(tasks, task_id, subject):
        return unknown_task()
    record = tasks.get(task_id)
    if record is not None:
        return JSONResponse(record.to_json())
    fallback = _bentoml_task(task_id)
    if fallback is None:
        return unknown_task()
    return JSONResponse(fallback)


def unknown_task() -> JSONResponse:
    """The one answer for a task id that does not exist, has expired, or is another subject's."""
    return error_response(NotFound("unknown or expired task id"))  # never echoes the id: it came from the caller


def cancel_task(tasks: TaskStates, task_id: str, subject: str) -> JSONResponse:
    """Cancel an active task of `subject`'s: its state turns `cancelled` now and its work stops at the next check. A
    task BentoML has queued but not started is entered in our store cancelled, so that its body stops at its first
    step."""
    if not visible_to(tasks, task_id, subject):
        return unknown_task()
    record = tasks.cancel(task_id)
    if record is None and (_bentoml_task(task_id) or {}).get("status") in ACTIVE:
        tasks.create(task_id, None, None)
        record = tasks.cancel(task_id)
    if record is None:
        return unknown_task()
    return JSONResponse(record.to_json())


def bentoml_result_store_path() -> Path:
    """The SQLite file BentoML's task endpoints use in this process."""
    return Path(BentoMLContainer.result_store_file.get())


def _bentoml_task(task_id: str) -> dict[str, Any] | None:
    """A task that BentoML knows but our store does not: queued, or refused before its body ran (validation). Reads
    BentoML 1.4.40's private `result` table (docs/bentoml-pitfalls.md R1)."""
    path = bentoml_result_store_path()
    if not path.exists():
        return None
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0) as connection:
        row = connection.execute("SELECT status, result, created_at, completed_at FROM result WHERE task_id = ?",
                                 (task_id,)).fetchone()
    if row is None:
        return None
    status = _BENTOML_STATUS.get(row[0], "processing")
    error = _stored_error(row[1]) if status == "failed" else None
    return {
        "task_id": task_id, "status": status, "progress": 100 if status in ("completed", "failed") else 0,
        "current_step": "queued" if status in ("pending", "processing") else status,
        "estimated_remaining_seconds": None, "created_at": str(row[2]) if row[2] else None,
        "completed_at": str(row[3]) if status == "completed" and row[3] else None,
        "failed_at": str(row[3]) if status == "failed" and row[3] else None, "cancelled_at": None,
        "result": None, "error": error,
    }


def _stored_error(serialized: bytes | str | None) -> dict[str, Any]:
    """The SPEC error of a response BentoML stored for a failed task (its own body shapes are normalised)."""
    try:
        response = json.loads(serialized or "{}")
        status = int(response.get("status", 500))
        body = json.loads(base64.b64decode(response.get("content", "")) or b"{}")
    except (ValueError, TypeError):
        return error_body("INTERNAL_SERVER_ERROR", "the task failed")["error"]
    if isinstance(body, dict) and body.get("success") is False and isinstance(body.get("error"), dict):
        return body["error"]
    payload = body[0] if isinstance(body, list) and body else body
    message = str(payload.get("error") or "the task failed") if isinstance(payload, dict) else "the task failed"
    details = {"errors": payload["detail"]} if isinstance(payload, dict) and isinstance(payload.get("detail"), list) else {}
    return error_body(STATUS_CODES.get(status, "INTERNAL_SERVER_ERROR"), message, details)["error"]


class TaskRoutesMiddleware:
    """Our side of BentoML's task routes, inside the JWT middleware:

    - `POST <route>`, which BentoML would run synchronously inside the request: submitted as a task instead, as
      the design has it; the answer is `/submit`'s (`{"task_id", "status"}`) with 202 Accepted;
    - `POST <route>/submit`: the Authorization header is dropped after authentication, so BentoML's task store
      (which keeps each request with its headers for 24 h) never holds a bearer token;
    - `PUT <route>/cancel?task_id=`: cancels through our task store, so the work really stops (BentoML's own
      handler answers 400 and lets the job run on); the answer is the design's task status body;
    - every submission records its submitter (the token's owner claim) before it is answered, and every route that
      takes a task id answers another subject's task as an unknown one (404).

    Distributed (replicas sharing PostgreSQL), BentoML's own store knows only the tasks its replica accepted, so:
    - the task is registered in the shared store before the submission is answered (a poll on another replica
      finds it at once), and a submission BentoML refused after answering (validation) is failed there too;
    - `GET <route>/status` and `<route>/get` are answered from the shared store, in BentoML's shapes;
    - while the database or the shared volume is unreachable, every task route answers 503 with `Retry-After` at once
      (`state.dependency_health`), a submission before BentoML sees it.
    """

    def __init__(self, app: ASGIApp, task_routes: tuple[str, ...], settings: Settings) -> None:
        self.app = app
        self.base_paths = frozenset(task_routes)
        self.submit_paths = frozenset(f"{route}/submit" for route in task_routes)
        self.cancel_paths = frozenset(f"{route}/cancel" for route in task_routes)
        self.status_paths = frozenset(f"{route}/status" for route in task_routes)
        self.get_paths = frozenset(f"{route}/get" for route in task_routes)
        self.by_id_paths = self.status_paths | self.get_paths | frozenset(f"{route}/retry" for route in task_routes)
        self.store_paths = self.base_paths | self.submit_paths | self.cancel_paths | self.by_id_paths
        self.tasks = open_task_store(settings)
        self.distributed = settings.distributed.enabled
        self.queue_max = settings.limits.mri_queue_max

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if not (self.distributed and path in self.store_paths):
            await self._route(scope, receive, send, path, method)
            return
        observed = ObservedSend(send)
        try:
            self.tasks.check_available()  # at once while the database or volume is known down: BentoML sees nothing
            await self._route(scope, receive, observed, path, method)
        except DependencyUnavailable as exc:
            if observed.started:
                raise
            await error_response(exc)(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send, path: str, method: str) -> None:
        subject = current_owner()
        task_id = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("task_id", [""])[0]
        reader = None
        if method == "PUT" and path in self.cancel_paths:
            reader = cancel_task
        elif self.distributed and method == "GET" and path in self.status_paths:
            reader = bentoml_status
        elif self.distributed and method == "GET" and path in self.get_paths:
            reader = bentoml_result
        if reader:
            response = (await asyncio.to_thread(reader, self.tasks, task_id, subject) if task_id
                        else error_response(InvalidRequest("task_id is required")))
            await response(scope, receive, send)
            return
        if path in self.by_id_paths and not await asyncio.to_thread(visible_to, self.tasks, task_id, subject):
            await unknown_task()(scope, receive, send)  # BentoML's own status / get / retry: owner first
            return
        if path in self.base_paths and method == "POST":
            path = f"{path}/submit"
            scope, send = {**scope, "path": path, "raw_path": path.encode()}, _accepted(send)
        if path in self.submit_paths:
            reservation = None
            if not self.distributed:  # one machine: a place in the bounded queue first
                reservation = await asyncio.to_thread(self.tasks.reserve, self.queue_max)
                if reservation is None:
                    await self._queue_full()(scope, receive, send)
                    return
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"authorization"]}
            await self._submit(scope, receive, send, subject, reservation)
            return
        await self.app(scope, receive, send)

    def _queue_full(self) -> JSONResponse:
        """One machine: the 429 for a submission beyond `mri_queue_max` unfinished tasks."""
        error = RateLimitExceeded(f"{self.queue_max} MRI tasks are unfinished; submit again later",
                                  {"reason": "task_queue_full", "retry_after_seconds": QUEUE_FULL_RETRY_AFTER_S})
        return error_response(error, {"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)})

    async def _submit(self, scope: Scope, receive: Receive, send: Send, subject: str, reservation: str | None) -> None:
        """Submit, recording the task's submitter (and registering the task: distributed, in the shared store; one
        machine, in the queue place `reservation` held) before the answer leaves, so that the first poll finds both
        and the next submission counts it. BentoML runs the task body after answering, within this call; distributed,
        a body refused by validation never queued the task, which is failed then."""
        accepted: list[str] = []
        held: Message | None = None
        refused: DependencyUnavailable | None = None

        def register(task_id: str) -> None:
            if subject:
                self.tasks.set_owner(task_id, subject)
            if reservation is not None:
                self.tasks.settle_reservation(reservation, task_id)
            if self.distributed:
                self.tasks.create(task_id, None, None)

        async def registering(message: Message) -> None:
            nonlocal held, refused
            if refused is not None:  # the 503 went out instead of BentoML's answer
                return
            if message["type"] == "http.response.start":
                held = message
                return
            if held is not None:
                start, held = held, None
                if task_id := _submitted_task_id(start, message):
                    try:
                        await asyncio.to_thread(register, task_id)
                    except DependencyUnavailable as exc:  # its body finds the store unreachable too: never queued
                        refused = exc
                        await error_response(exc)(scope, receive, send)
                        return
                    accepted.append(task_id)
                await send(start)
            await send(message)

        try:
            await self.app(scope, receive, registering)
        finally:
            if reservation is not None and not accepted:  # refused, or failed before answering: the place is free
                await asyncio.to_thread(self.tasks.settle_reservation, reservation, None)
        for task_id in accepted if self.distributed else []:
            try:
                await self._fail_unqueued(task_id)
            except DependencyUnavailable:  # answered already; the orphan sweep fails a task never queued
                log.warning("task %s: whether it was queued could not be checked (dependency unreachable)", task_id)

    async def _fail_unqueued(self, task_id: str) -> None:
        """Distributed: fail a task whose body never queued it (refused by validation), with BentoML's error."""
        record = await asyncio.to_thread(self.tasks.get, task_id)
        if record is not None and record.status == "pending" and await asyncio.to_thread(
                self.tasks.params, task_id) is None:
            stored = await asyncio.to_thread(_bentoml_task, task_id)
            error = (stored or {}).get("error") or error_body(
                "INTERNAL_SERVER_ERROR", "the task could not be queued")["error"]
            await asyncio.to_thread(self.tasks.fail, task_id, {"error": error})


async def in_turn(slots: PriorityGate, priority: Priority, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work` once one of this worker's MRI slots is its turn (the task waits `pending` till then: after every
    urgent task waiting, if it is routine, and after the tasks of its priority that came first)."""
    async with slots.slot(priority):
        return await work()


def _submitted_task_id(start: Message, body: Message) -> str | None:
    """The task id of a successful submission's answer (one JSON body), else None."""
    if start["status"] >= 300 or body.get("more_body"):
        return None
    try:
        answer = json.loads(body.get("body", b""))
    except ValueError:
        return None
    return answer.get("task_id") if isinstance(answer, dict) else None


def bentoml_status(tasks: TaskStates, task_id: str, subject: str) -> JSONResponse:
    """BentoML's `<route>/status` body from our store (distributed mode: the shared store)."""
    record = tasks.get(task_id) if visible_to(tasks, task_id, subject) else None
    if record is None:
        return unknown_task()
    body = record.to_json()
    return JSONResponse({"task_id": task_id, "status": _AS_BENTOML[record.status], "created_at": body["created_at"],
                         "executed_at": body["completed_at"] or body["failed_at"] or body["cancelled_at"]})


def bentoml_result(tasks: TaskStates, task_id: str, subject: str) -> JSONResponse:
    """BentoML's `<route>/get` from our store: the result, the task's error with its status, 409 when cancelled,
    400 while it runs."""
    record = tasks.get(task_id) if visible_to(tasks, task_id, subject) else None
    if record is None:
        return unknown_task()
    if record.status == "completed":
        return JSONResponse(record.result)
    if record.status == "failed" and record.error:
        return JSONResponse({"success": False, "error": record.error}, status_code=_status_of(record.error["code"]))
    if record.status == "cancelled":
        return error_response(TaskCancelledError("the task was cancelled", {"task_id": task_id}))
    return error_response(InvalidRequest(f"task {task_id} is not completed yet", {"status": record.status}))


def _status_of(code: str) -> int:
    """The HTTP status of an error code (500 for one we do not know)."""
    pending, statuses = [NeuroNovaError], {}
    while pending:
        cls = pending.pop()
        statuses[cls.code] = cls.status
        pending.extend(cls.__subclasses__())
    return statuses.get(code, 500)


def _accepted(send: Send) -> Send:
    """`send` with a successful submission's 200 turned into 202 Accepted (errors keep their status)."""

    async def accepted(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 200:
            message = {**message, "status": 202}
        await send(message)

    return accepted
