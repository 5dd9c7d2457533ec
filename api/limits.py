"""Request limits enforced before a body is read whole: size per route, and requests per minute per client."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict, deque

from sqlalchemy import text
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from state import shared_db
from core.errors import DependencyUnavailable, ImageTooLarge, RateLimitExceeded
from core.settings import LimitSettings, RateLimitSettings

log = logging.getLogger(__name__)
MULTIPART_OVERHEAD = 1 * 2**20
"""Room for the form fields and multipart boundaries around an upload of the maximum size."""


def route_body_limit(path: str, limits: LimitSettings) -> int:
    """The body limit of a route: the upload limit for image and model routes, the JSON limit otherwise."""
    if path.startswith("/predict/ct_classification"):
        return limits.ct_max_bytes + MULTIPART_OVERHEAD
    if path.startswith("/predict/mri_segmentation"):
        return limits.mri_max_bytes + MULTIPART_OVERHEAD
    if path == "/update_model":
        return limits.model_upload_max_bytes + MULTIPART_OVERHEAD
    return limits.json_max_bytes


class BodyLimitMiddleware:
    """413 IMAGE_TOO_LARGE from the Content-Length header at once, or as soon as a chunked body passes the limit."""

    def __init__(self, app: ASGIApp, limits: LimitSettings) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = route_body_limit(scope["path"], self.limits)
        too_large = ImageTooLarge(f"request body exceeds {limit // 2**20} MB for {scope['path']}", {"limit_bytes": limit})
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await error_response(too_large)(scope, receive, send)
            return
        received = 0
        overflowed = False
        answered = False

        async def counting_receive() -> Message:
            nonlocal received, overflowed
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    overflowed = True
                    return {"type": "http.disconnect"}
            return message

        async def answer_too_large() -> None:
            nonlocal answered
            if not answered:
                answered = True
                await error_response(too_large)(scope, receive, send)

        async def guarded_send(message: Message) -> None:
            if not overflowed:
                await send(message)
            elif message["type"] == "http.response.start":
                await answer_too_large()

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not overflowed:
                raise
            await answer_too_large()


class LocalWindows:
    """Embedded mode: a sliding one-minute window per bucket in this API worker's memory (with N workers a client
    may get up to N times the limit)."""

    def __init__(self) -> None:
        self.hits: dict[str, deque[float]] = defaultdict(deque)

    async def admit(self, bucket: str, limit: int) -> int | None:
        """None when the request is admitted (and counted), else the seconds to wait."""
        window = self.hits[bucket]
        now = time.monotonic()
        while window and now - window[0] >= 60.0:
            window.popleft()
        if len(window) >= limit:
            return max(1, math.ceil(60.0 - (now - window[0])))
        window.append(now)
        return None


class SharedWindows:
    """Distributed mode: one limit across every worker of every replica, as a fixed one-minute window per bucket in
    the shared PostgreSQL: one `INSERT … ON CONFLICT DO UPDATE … RETURNING` round trip per request (in a thread,
    off the event loop), on the database's clock, so replicas' clocks need not agree. A fixed window admits up to
    twice the limit across a minute boundary. Refused requests count too (they cannot lift a refusal). Windows older
    than two minutes are deleted by whichever worker first sees a new minute."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._swept_window = 0

    def _hit(self, bucket: str) -> tuple[int, float]:
        with shared_db.engine(self.database_url).begin() as connection:
            hits, window_start, now = connection.execute(text(
                "INSERT INTO neuronova_rate_limits AS r (bucket, window_start, hits) "
                "VALUES (:bucket, floor(extract(epoch FROM statement_timestamp()) / 60)::bigint * 60, 1) "
                "ON CONFLICT (bucket, window_start) DO UPDATE SET hits = r.hits + 1 "
                "RETURNING r.hits, r.window_start, extract(epoch FROM statement_timestamp())::float8"),
                {"bucket": bucket}).one()
            if window_start > self._swept_window:
                self._swept_window = window_start
                connection.execute(text("DELETE FROM neuronova_rate_limits WHERE window_start < :old"),
                                   {"old": window_start - 120})
        return hits, window_start + 60.0 - now

    async def admit(self, bucket: str, limit: int) -> int | None:
        """None when the request is admitted, else the seconds to the next window. Fails open (logged) while the
        database cannot be reached: a clinician's request is not refused for want of a counter, nor delayed (once a
        connection failed, the database's breaker refuses at once until its probe succeeds)."""
        try:
            hits, remaining = await asyncio.to_thread(self._hit, bucket)
        except DependencyUnavailable:  # the database's breaker is open: no wait at all (state.dependency_health)
            return None
        except Exception as exc:  # noqa: BLE001 - any database failure
            log.warning("rate limit not applied, shared counters unavailable: %s", exc)
            return None
        return None if hits <= limit else max(1, math.ceil(remaining))


class RateLimitMiddleware:
    """Requests per minute per client (token subject, else address) and route; 429 with Retry-After.

    Counted per API worker (`LocalWindows`) unless `database_url` names the replicas' shared database
    (`SharedWindows`).
    """

    def __init__(self, app: ASGIApp, rate_limit: RateLimitSettings, exempt_paths: frozenset[str],
                 database_url: str | None = None) -> None:
        self.app = app
        self.settings = rate_limit
        self.exempt = exempt_paths
        self.windows = SharedWindows(database_url) if database_url else LocalWindows()

    def _limit(self, path: str) -> int:
        return self.settings.per_route_per_minute.get(path, self.settings.default_per_minute)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self._limit(scope.get("path", ""))
        if scope["type"] != "http" or not self.settings.enabled or scope["path"] in self.exempt or not limit:
            await self.app(scope, receive, send)
            return
        claims = scope.get("state", {}).get("claims") or {}
        client = str(claims.get("sub") or (scope.get("client") or ("unknown",))[0])
        retry_after = await self.windows.admit(f"{client} {scope['path']}", limit)
        if retry_after is not None:
            error = RateLimitExceeded(f"more than {limit} requests per minute to {scope['path']}", {"retry_after_seconds": retry_after})
            await error_response(error, {"Retry-After": str(retry_after)})(scope, receive, send)
            return
        await self.app(scope, receive, send)
