"""Typed errors of the client: the service's SPEC error schema becomes `ServiceError`."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

# The service's own status -> code table (api/errors.py), for bodies not in the SPEC shape (a proxy's page, say).
STATUS_CODES = {
    400: "INVALID_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND", 413: "IMAGE_TOO_LARGE",
    429: "RATE_LIMIT_EXCEEDED", 503: "SERVICE_UNAVAILABLE", 504: "TIMEOUT",
}
RETRYABLE_STATUSES = frozenset({429, 503})


class NeuroNovaClientError(Exception):
    """Anything that stopped a call to the NeuroNova service."""


class ServiceUnreachable(NeuroNovaClientError):
    """No answer from the service (connection refused, timed out), after the retries allowed."""


class ServiceError(NeuroNovaClientError):
    """The service answered with an error: `{"success": false, "error": {code, message, details}}` (SPEC.md)."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Whether the service refused before doing any work (rate limited, overloaded, model not loaded)."""
        return self.status in RETRYABLE_STATUSES

    def to_body(self) -> dict[str, Any]:
        """The SPEC error body, to hand on to the Django client unchanged."""
        return {"success": False, "error": {"code": self.code, "message": self.message, "details": self.details}}

    @classmethod
    def from_response(cls, status: int, text: str, retry_after: str | None = None) -> ServiceError:
        """Parse an error answer; bodies outside the SPEC shape (BentoML's own, a proxy's) get the status's code."""
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        seconds = parse_retry_after(retry_after)
        if isinstance(error, dict) and "code" in error:
            return cls(status, str(error["code"]), str(error.get("message", "")), error.get("details") or {}, seconds)
        return cls(status, STATUS_CODES.get(status, "INTERNAL_SERVER_ERROR"), text.strip()[:500] or f"HTTP {status}",
                   retry_after=seconds)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
