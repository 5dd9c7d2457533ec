"""The app's settings: one `NEURONOVA` dict in the Django settings, e.g.

    NEURONOVA = {"URL": "http://neuronova:3000", "JWT_SECRET": env("NEURONOVA_AUTH__SECRET"),
                 "TIMEOUT_SECONDS": 60, "RETRIES": 3}

Keys are the upper-case names of `ClientSettings` fields; `URL` and `JWT_SECRET` are required.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

# The service's `reviewer_id` is `^[A-Za-z0-9_.-]+$`, at most 64 characters: the prefix leaves 20 for the user's pk.
REVIEWER_PREFIX = re.compile(r"[A-Za-z0-9_.-]{0,44}")


@dataclass(frozen=True)
class ClientSettings:
    """Where the service is, how to sign its tokens (its `NEURONOVA_AUTH__*` settings), timeouts and retries, and
    the prefix of the anonymised reviewer id sent with a doctor's verdict (`<prefix><user pk>`, never a name)."""

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
    reviewer_id_prefix: str = "django-user-"

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
        if not REVIEWER_PREFIX.fullmatch(values.get("reviewer_id_prefix", "")):
            raise ImproperlyConfigured("NEURONOVA: REVIEWER_ID_PREFIX must be at most 44 of A-Z a-z 0-9 _ . -")
        return cls(**values)


def client_settings() -> ClientSettings:
    """The current `settings.NEURONOVA`."""
    return ClientSettings.from_mapping(getattr(settings, "NEURONOVA", {}))
