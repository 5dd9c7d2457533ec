"""The app's settings: one `NEURONOVA` dict in the Django settings, e.g.

    NEURONOVA = {"URL": "http://neuronova:3000", "JWT_SECRET": env("NEURONOVA_AUTH__SECRET"),
                 "TIMEOUT_SECONDS": 60, "RETRIES": 3}

Keys are the upper-case names of `ClientSettings` fields; `URL` and `JWT_SECRET` are required.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


@dataclass(frozen=True)
class ClientSettings:
    """Where the service is, how to sign its tokens (its `NEURONOVA_AUTH__*` settings), timeouts and retries."""

    url: str
    jwt_secret: str
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_role: str = "clinician"
    role_claim: str = "role"
    token_ttl_seconds: int = 300
    timeout_seconds: float = 60.0
    connect_timeout_seconds: float = 5.0
    retries: int = 3
    backoff_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    poll_interval_seconds: float = 2.0

    @classmethod
    def from_mapping(cls, raw: dict[str, Any]) -> ClientSettings:
        """Settings from upper-case keys; unknown keys and a missing URL or secret are configuration errors."""
        known = {f.name for f in fields(cls)}
        values = {key.lower(): value for key, value in raw.items()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ImproperlyConfigured(f"NEURONOVA: unknown keys {[k.upper() for k in unknown]}")
        missing = [name.upper() for name in ("url", "jwt_secret") if not values.get(name)]
        if missing:
            raise ImproperlyConfigured(f"NEURONOVA: {missing} must be set")
        return cls(**values)


def client_settings() -> ClientSettings:
    """The current `settings.NEURONOVA`."""
    return ClientSettings.from_mapping(getattr(settings, "NEURONOVA", {}))
