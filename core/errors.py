"""One error hierarchy for every room, each error carrying its SPEC.md code and HTTP status.

Preprocessing, runners and xai raise these; only `api/` turns them into HTTP responses.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, ClassVar


class NeuroNovaError(Exception):
    """Base error: a SPEC.md error code, an HTTP status, a message and optional details."""

    code: ClassVar[str] = "INTERNAL_SERVER_ERROR"
    status: ClassVar[int] = 500

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def to_body(self) -> dict[str, Any]:
        """The SPEC.md error body: `{success: false, error: {code, message, details, timestamp}}`."""
        return error_body(self.code, self.message, self.details)


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the SPEC.md error body for any code (also used for errors that are not ours)."""
    return {
        "success": False,
        "error": {
            "code": code,
            "message": message,
            "details": details or {},
            "timestamp": datetime.now(timezone.utc).isoformat(),
        },
    }


class InvalidRequest(NeuroNovaError):
    code, status = "INVALID_REQUEST", 400


class InvalidImageFormat(NeuroNovaError):
    code, status = "INVALID_IMAGE_FORMAT", 400


class ImageTooLarge(NeuroNovaError):
    code, status = "IMAGE_TOO_LARGE", 413


class Unauthorized(NeuroNovaError):
    code, status = "UNAUTHORIZED", 401


class Forbidden(NeuroNovaError):
    """Authenticated, but the token's role may not call this route (e.g. non-admin on /update_model)."""

    code, status = "FORBIDDEN", 403


class NotFound(NeuroNovaError):
    """An unknown or expired id (task, earlier request)."""

    code, status = "NOT_FOUND", 404


class RateLimitExceeded(NeuroNovaError):
    code, status = "RATE_LIMIT_EXCEEDED", 429


class ModelNotLoaded(NeuroNovaError):
    code, status = "MODEL_NOT_LOADED", 503


class DependencyUnavailable(NeuroNovaError):
    """A dependency of the route (the replicas' database, the shared volume) cannot be reached now: 503 with
    `Retry-After`, `details.reason` naming it (`state.dependency_health`)."""

    code, status = "SERVICE_UNAVAILABLE", 503
    retry_after_seconds: ClassVar[int] = 5


class ModelInferenceError(NeuroNovaError):
    code, status = "MODEL_INFERENCE_ERROR", 500


class XaiGenerationError(NeuroNovaError):
    code, status = "XAI_GENERATION_ERROR", 500


class InternalServerError(NeuroNovaError):
    code, status = "INTERNAL_SERVER_ERROR", 500


class ModelCardError(NeuroNovaError):
    """A model card that is invalid or disagrees with its model file (import time)."""

    code, status = "INVALID_MODEL_CARD", 400
