"""Retries with exponential backoff, only where a retry cannot repeat work the service already did."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx

from neuronova_client.errors import ServiceError, ServiceUnreachable

log = logging.getLogger("neuronova_client")
T = TypeVar("T")
# The request never reached the service: safe to send again whatever the method.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` more attempts after the first; waits `base * 2**n` (full jitter), capped, or the Retry-After."""

    retries: int = 3
    base_seconds: float = 0.5
    max_seconds: float = 30.0

    def delay(self, attempt: int, retry_after: float | None, jitter: Callable[[], float] = random.random) -> float:
        """Seconds to wait before attempt `attempt + 1` (attempt counts from 0)."""
        if retry_after is not None:
            return min(retry_after, self.max_seconds)
        return min(self.base_seconds * 2**attempt, self.max_seconds) * (0.5 + 0.5 * jitter())


def call_with_retries(operation: Callable[[], T], policy: RetryPolicy, *, idempotent: bool,
                      sleep: Callable[[float], None] = time.sleep) -> T:
    """Run `operation`, retrying 429 and 503 answers and connections that never reached the service; an idempotent
    operation (a GET) is also retried after any transport error. Transport errors end as `ServiceUnreachable`."""
    attempt = 0
    while True:
        try:
            return operation()
        except ServiceError as error:
            if not error.retryable or attempt >= policy.retries:
                raise
            wait = policy.delay(attempt, error.retry_after)
        except httpx.TransportError as error:
            if not (idempotent or isinstance(error, NOT_SENT)) or attempt >= policy.retries:
                raise ServiceUnreachable(f"NeuroNova service unreachable: {error!r}") from error
            wait = policy.delay(attempt, None)
        log.warning("NeuroNova call failed (attempt %d of %d), retrying in %.2f s", attempt + 1,
                    policy.retries + 1, wait)
        sleep(wait)
        attempt += 1
