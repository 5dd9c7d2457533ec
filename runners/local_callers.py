"""BentoML's local caller of an API method, built once per service instance instead of on every attribute access.

BentoML 1.4.40 (`_bentoml_sdk.method.APIMethod.__get__`) builds a new wrapper — `inspect.signature` of the method,
`functools.wraps` — each time a service's API method is looked up, which its server does for every request.
The wrapper depends on the method and the instance alone, so it is kept in the instance's `__dict__` (a lone biomarker
request: 0.10-0.17 ms less, bench/ab_lone.py, docs/performance.md).
"""

from __future__ import annotations

from typing import Any

from _bentoml_sdk.method import APIMethod

_CACHE = "__neuronova_local_callers__"


def cache_local_callers() -> None:
    """Make `APIMethod._local_call` remember its wrapper per instance and method (idempotent)."""
    build = APIMethod._local_call
    if getattr(build, "__cached__", False):
        return

    def local_call(self: APIMethod, instance: Any) -> Any:
        callers = instance.__dict__.setdefault(_CACHE, {})
        caller = callers.get(self.name)
        if caller is None:
            caller = callers[self.name] = build(self, instance)
        return caller

    local_call.__cached__ = True  # type: ignore[attr-defined]
    APIMethod._local_call = local_call
