"""Request limits enforced before a body is read whole: size per route, and requests per minute per client."""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from core.errors import ImageTooLarge, RateLimitExceeded
from core.settings import LimitSettings, RateLimitSettings

MULTIPART_OVERHEAD = 1 * 2**20
"""Room for the form fields and multipart boundaries around an upload of the maximum size."""


def route_body_limit(path: str, limits: LimitSettings) -> int:
    """The body limit of a route: the upload limit for image routes, the JSON limit otherwise."""
    if path.startswith("/predict/ct_classification"):
        return limits.ct_max_bytes + MULTIPART_OVERHEAD
    if path.startswith("/predict/mri_segmentation"):
        return limits.mri_max_bytes + MULTIPART_OVERHEAD
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


class RateLimitMiddleware:
    """Sliding one-minute window per client (token subject, else address) and route; 429 with Retry-After.

    The window lives in each API worker process, so with N workers a client may get up to N times the limit.
    """

    def __init__(self, app: ASGIApp, rate_limit: RateLimitSettings, exempt_paths: frozenset[str]) -> None:
        self.app = app
        self.settings = rate_limit
        self.exempt = exempt_paths
        self.hits: dict[tuple[str, str], deque[float]] = defaultdict(deque)

    def _limit(self, path: str) -> int:
        return self.settings.per_route_per_minute.get(path, self.settings.default_per_minute)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.settings.enabled or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope["path"])
        claims = scope.get("state", {}).get("claims") or {}
        client = str(claims.get("sub") or (scope.get("client") or ("unknown",))[0])
        window = self.hits[(client, scope["path"])]
        now = time.monotonic()
        while window and now - window[0] >= 60.0:
            window.popleft()
        if limit and len(window) >= limit:
            retry_after = max(1, math.ceil(60.0 - (now - window[0])))
            error = RateLimitExceeded(f"more than {limit} requests per minute to {scope['path']}", {"retry_after_seconds": retry_after})
            await error_response(error, {"Retry-After": str(retry_after)})(scope, receive, send)
            return
        window.append(now)
        await self.app(scope, receive, send)
