"""Structured access log: one JSON line per request with request id, route, model, version, latency and outcome.

Only whitelisted, non-identifying fields are logged: never headers (tokens), query strings, form fields or bodies
(patient ids, DICOM tags). Model, version, request id and error code are read from the first bytes of our own
response, where the response models put them.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from datetime import UTC, datetime
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

ACCESS_LOGGER = "neuronova.access"
PROBE_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})
"""Polled by orchestrators every few seconds: not logged."""
ROUTE_MODELS = (
    ("/predict/ct_classification", "ct_classification"),
    ("/predict/mri_segmentation", "mri_segmentation"),
    ("/predict/biomarker_prediction", "biomarker_prediction"),
    ("/xai/explain", "ct_classification"),
)
SCAN_BYTES = 4096
RESPONSE_FIELD = re.compile(rb'"(request_id|model_id|model_version|code)"\s*:\s*"([A-Za-z0-9_.:+-]{1,160})"')
SAFE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


class JsonLineFormatter(logging.Formatter):
    """Renders a record as one JSON object: timestamp, level, logger, message, plus its `access` fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
        }
        line.update(getattr(record, "access", {}))
        return json.dumps(line, separators=(",", ":"))


def access_logger() -> logging.Logger:
    """The access logger with its own JSON-lines handler on stderr (added once per process)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(h.formatter, JsonLineFormatter) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonLineFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def route_model(path: str) -> str | None:
    """The model a route serves, when the path says it."""
    return next((model for prefix, model in ROUTE_MODELS if path.startswith(prefix)), None)


def outcome(status: int) -> str:
    return "ok" if status < 400 else "client_error" if status < 500 else "server_error"


class AccessLogMiddleware:
    """Outermost middleware: times each request and logs its access line when the response is complete. The line's
    route is `route_label(path)`: the route as written (`/task/{task_id}`, never a task id or whatever a caller put in
    a path), `other` for a path the service does not serve (`api.metric_labels.EndpointLabels`)."""

    def __init__(self, app: ASGIApp, route_label: Callable[[str], str]) -> None:
        self.app = app
        self.log = access_logger()
        self.route_label = route_label

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        headers: dict[bytes, bytes] = {}
        head = b""

        async def observe(message: Message) -> None:
            nonlocal status, headers, head
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = {k.lower(): v for k, v in message.get("headers", [])}
            elif message["type"] == "http.response.body" and len(head) < SCAN_BYTES:
                head += message.get("body", b"")[: SCAN_BYTES - len(head)]
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            self.log.info("request", extra={"access": self._fields(scope, status, headers, head, started)})

    def _fields(self, scope: Scope, status: int, headers: dict[bytes, bytes], head: bytes, started: float
                ) -> dict[str, Any]:
        found: dict[str, str] = {}
        for key, value in RESPONSE_FIELD.findall(head):
            found.setdefault(key.decode(), value.decode())
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = found.get("request_id") or (given if SAFE_ID.fullmatch(given) else None)
        return {
            "request_id": request_id or f"req_{uuid.uuid4().hex}",
            "bentoml_request_id": headers.get(b"x-bentoml-request-id", b"").decode("latin-1") or None,
            "method": scope["method"],
            "route": self.route_label(scope["path"]),
            "model": found.get("model_id") or route_model(scope["path"]),
            "version": found.get("model_version"),
            "status": status,
            "outcome": outcome(status),
            "error_code": found.get("code") if status >= 400 else None,
            "latency_ms": round((time.perf_counter() - started) * 1000.0, 2),
        }
