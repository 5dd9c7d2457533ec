"""The one place where exceptions (ours, BentoML's, pydantic's) become SPEC.md error responses."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

from pydantic import ValidationError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.buffered_responses import ObservedSend, rewriting, with_length
from core.errors import DependencyUnavailable, InternalServerError, InvalidRequest, NeuroNovaError, error_body
from state.dependency_health import unreachable_dependency

log = logging.getLogger("neuronova.errors")
P = ParamSpec("P")
R = TypeVar("R")

STATUS_CODES = {
    400: "INVALID_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND", 405: "INVALID_REQUEST",
    413: "IMAGE_TOO_LARGE", 415: "INVALID_REQUEST", 422: "INVALID_REQUEST", 429: "RATE_LIMIT_EXCEEDED",
    503: "SERVICE_UNAVAILABLE", 504: "TIMEOUT",
}
UNTOUCHED_PATHS = frozenset({"/health", "/metrics", "/livez", "/healthz", "/readyz"})
"""Paths whose own error bodies are the contract (/health answers 503 with its health body)."""


def error_response(error: NeuroNovaError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The SPEC.md error body with the error's HTTP status (and `Retry-After` for an unreachable dependency)."""
    if isinstance(error, DependencyUnavailable):
        headers = {"Retry-After": str(error.retry_after_seconds), **(headers or {})}
    return JSONResponse(error.to_body(), status_code=error.status, headers=headers)


def validation_details(exc: ValidationError) -> dict[str, Any]:
    """Pydantic errors without the offending input values (they may hold patient data)."""
    return {"errors": [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]}


def as_neuronova_error(exc: Exception) -> NeuroNovaError:
    """Our errors pass through; pydantic's become INVALID_REQUEST; anything else INTERNAL_SERVER_ERROR (logged)."""
    if isinstance(exc, NeuroNovaError):
        return exc
    if isinstance(exc, ValidationError):
        return InvalidRequest(f"{exc.error_count()} invalid field(s)", validation_details(exc))
    if unreachable_dependency(exc):
        log.warning("the database is unreachable: %s", type(exc).__name__)
        return DependencyUnavailable("the database is unreachable; try again shortly", {"reason": "database_unreachable"})
    log.exception("unexpected error", exc_info=exc)
    return InternalServerError("unexpected server error; the request id is in the server log")


def handles_errors(func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R | JSONResponse]]:
    """Decorate an async API method so every exception it raises becomes the SPEC.md error response."""

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | JSONResponse:
        try:
            return await func(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - this is the mapping point
            return error_response(as_neuronova_error(exc))

    return wrapper


def _message_of(body: bytes, status: int) -> tuple[str, dict[str, Any]]:
    """The message and details of a body BentoML or Starlette produced (a dict, a list of dicts, or text)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return (body.decode("utf-8", "replace").strip() or f"HTTP {status}"), {}
    if isinstance(payload, list) and payload and isinstance(payload[0], dict):
        payload = payload[0]
    if isinstance(payload, dict):
        if isinstance(payload.get("detail"), list):  # FastAPI's validation errors: they quote the refused input
            errors = [_without_values(item) for item in payload["detail"]]
            return f"{len(errors)} invalid field(s)", {"errors": errors}
        return str(payload.get("error") or payload.get("detail") or f"HTTP {status}"), {}
    return f"HTTP {status}", {}


def _without_values(error: Any) -> Any:
    """A framework's validation error item (FastAPI's 422 `detail`) without the refused input it quotes."""
    return {key: error[key] for key in ("loc", "msg", "type") if key in error} if isinstance(error, dict) else error


def _is_schema_body(body: bytes) -> bool:
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    return isinstance(payload, dict) and payload.get("success") is False and "error" in payload


class ErrorSchemaMiddleware:
    """Rewrites every error response that is not already in the SPEC.md schema (BentoML's own 400/404/500 bodies)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTOUCHED_PATHS:
            await self.app(scope, receive, send)
            return

        async def send_rewritten(start_message: Message, body: bytes) -> None:
            status = start_message["status"]
            if not _is_schema_body(body):
                message, details = _message_of(body, status)
                code = STATUS_CODES.get(status, "INTERNAL_SERVER_ERROR")
                if status >= 500 and code == "INTERNAL_SERVER_ERROR":
                    message = "unexpected server error"
                body = json.dumps(error_body(code, message, details)).encode()
            headers = with_length(start_message.get("headers", []), body, b"content-type")
            await send({"type": "http.response.start", "status": status,
                        "headers": [*headers, (b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})

        observed = ObservedSend(rewriting(send, lambda status: status >= 400, send_rewritten))
        try:
            await self.app(scope, receive, observed)
        except Exception as exc:  # a middleware's store call, say: answered when nothing was sent yet
            if observed.started or not unreachable_dependency(exc):
                raise
            await error_response(as_neuronova_error(exc))(scope, receive, send)
