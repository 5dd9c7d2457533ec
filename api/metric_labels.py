"""A bounded `endpoint` label on BentoML's request metrics.

BentoML's metrics middleware runs before authentication and labels every series with the raw request path: each
unauthenticated request to a random path adds series to `/metrics` without bound, and every `/task/<id>` call leaves
its task id there. `BoundedEndpointLabels` is that middleware with the label one of the service's own routes, an id in
a path replaced by its placeholder (`/task/{task_id}`), and anything else `other`. The request itself still sees its
real path. Installed by `install(routes)` (through `api.bentoml_patches.install`), before BentoML builds its app.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from bentoml._internal.server.http import instruments
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

OTHER = "other"
REAL_PATH = "neuronova.real_path"
"""The request's own path, carried past the metrics middleware in a scope whose `path` is the label."""
_ALWAYS = ("/metrics", "/livez", "/readyz", "/healthz", "/docs.json", "/")
TASK_ROUTE_SUFFIXES = ("/submit", "/status", "/get", "/retry", "/cancel")
"""The routes BentoML adds under a task's route."""


class EndpointLabels:
    """Path → label: a route as written (templates with their placeholders), else `OTHER`."""

    def __init__(self, routes: Iterable[str]) -> None:
        self.exact: set[str] = set(_ALWAYS)
        self.templates: list[tuple[re.Pattern[str], str]] = []
        for route in routes:
            if "{" in route:
                pattern, template, _ = compile_path(route)
                self.templates.append((pattern, template))
            else:
                self.exact.add(route)

    def __call__(self, path: str) -> str:
        if path in self.exact:
            return path
        for pattern, template in self.templates:
            if pattern.match(path):
                return template
        return OTHER


class _RealPath:
    """Below the metrics middleware: hands the request its real path back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        real = scope.get(REAL_PATH)
        if real is not None:
            scope = {**scope, "path": real}
        await self.app(scope, receive, send)


def bounded_middleware(labels: EndpointLabels) -> type:
    """BentoML's `RunnerTrafficMetricsMiddleware` labelling with `labels`."""

    class BoundedEndpointLabels(instruments.RunnerTrafficMetricsMiddleware):
        def __init__(self, app: ASGIApp, **kwargs: Any) -> None:
            super().__init__(_RealPath(app), **kwargs)

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                label = labels(scope["path"])
                if label != scope["path"]:
                    scope = {**scope, "path": label, REAL_PATH: scope["path"]}
            await super().__call__(scope, receive, send)

    return BoundedEndpointLabels


def service_routes(ops_routes: Iterable[Any], apis: Iterable[Any]) -> list[str]:
    """The paths of a service's routes: its ASGI app's (templates included) and its BentoML APIs' (a task's with the
    routes BentoML adds under it)."""
    paths = _paths(ops_routes)
    for api in apis:
        paths += [api.route, *(f"{api.route}{suffix}" for suffix in TASK_ROUTE_SUFFIXES if api.is_task)]
    return paths


def _paths(routes: Iterable[Any]) -> list[str]:
    """Route paths, through included routers (FastAPI keeps a router's routes on the route that includes it)."""
    found = []
    for route in routes:
        if isinstance(getattr(route, "path", None), str):
            found.append(route.path)
        inner = getattr(route, "original_router", route)
        if inner is not route or getattr(route, "routes", None):
            found += _paths(getattr(inner, "routes", []))
    return found


def install(routes: Iterable[str]) -> None:
    """Label BentoML's request metrics by `routes` (the service's routes; placeholders in braces)."""
    instruments.RunnerTrafficMetricsMiddleware = bounded_middleware(EndpointLabels(routes))  # type: ignore[misc]
