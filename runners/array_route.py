"""A lean route into a runner for small arrays: raw bytes in and out, batched by BentoML's own adaptive dispatcher.

A biomarker request's model work is a 16-float row and ~0.4 ms of trees; BentoML's route for a runner method costs
about as much again around it (pydantic IO models, pickle, its endpoint and batching wrappers on both sides). This
route carries the array as its bytes (`x-shape`, `x-dtype` headers) to a `CorkDispatcher` — the class BentoML batches
its own routes with, with the method's own batch limits — which calls the runner's method on the merged batch: a lone
biomarker request is 0.26-0.27 ms faster (bench/ab_lone.py, docs/performance.md), and concurrent requests are still
batched. Errors answer as BentoML's runner routes do (a status and `{"error": ...}`), and the API side maps them with
BentoML's own client mapping, so a caller sees the same exceptions either way. BentoML's route for each method stays.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Sequence
from typing import Any

import bentoml
import numpy as np
from _bentoml_impl.client.proxy2 import AsyncClient, map_exception
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.marshal.dispatcher import CorkDispatcher
from bentoml.exceptions import ServiceUnavailable
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger(__name__)

PATH = "/arrays"
"""Where a runner mounts its array routes: POST {PATH}/{method}."""
DTYPES = frozenset({np.dtype("<f4"), np.dtype("<f8")})
"""Element types the route carries (little-endian float32 and float64)."""
MAX_DIMENSIONS = 4


def encode(array: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """An array as its C-order bytes and the headers that say how to read them back."""
    array = np.ascontiguousarray(array)
    if array.dtype not in DTYPES:
        raise ValueError(f"dtype {array.dtype} is not carried (only {sorted(d.str for d in DTYPES)})")
    return array.tobytes(), {"x-shape": ",".join(map(str, array.shape)), "x-dtype": array.dtype.str,
                             "content-type": "application/octet-stream"}


def decode(body: bytes, headers: Any) -> np.ndarray:
    """The array `encode` made; ValueError naming the header or size that does not fit."""
    try:
        dtype = np.dtype(headers["x-dtype"])
        shape = tuple(int(n) for n in headers["x-shape"].split(","))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"x-dtype and x-shape must name the array's element type and shape ({exc})") from None
    if dtype not in DTYPES or not 1 <= len(shape) <= MAX_DIMENSIONS or min(shape) < 0:
        raise ValueError(f"x-dtype {dtype.str} / x-shape {shape}: not an array this route carries")
    if int(np.prod(shape)) * dtype.itemsize != len(body):
        raise ValueError(f"x-shape {shape} of {dtype.str} needs {int(np.prod(shape)) * dtype.itemsize} bytes, "
                         f"the body has {len(body)}")
    return np.frombuffer(body, dtype).reshape(shape)


class ArrayRoutes:
    """POST /{method}: an (N, ...) array in, the method's (N, ...) output back, for batchable runner `methods` of the
    current BentoML service. Concurrent calls of a method are merged along the first axis by a `CorkDispatcher` with
    `max_batch_size` rows and `max_latency_ms` (the method's BentoML batching settings). The method is called on the
    event loop: an async method decides where its work runs (the biomarker runner's: a lone row on the loop, a batch in
    its model thread); a sync one would block the loop while it runs."""

    def __init__(self, methods: Sequence[str], max_batch_size: int, max_latency_ms: int) -> None:
        self.methods = frozenset(methods)
        self.max_batch_size = max_batch_size
        self.max_latency_ms = max_latency_ms
        self._dispatched: dict[str, Any] = {}
        self.app = Starlette(routes=[Route("/{method}", self.endpoint, methods=["POST"])])

    async def endpoint(self, request: Request) -> Response:
        method = request.path_params["method"]
        if method not in self.methods:
            return JSONResponse({"error": f"no array route for {method!r}"}, status_code=404)
        try:
            rows = decode(await request.body(), request.headers)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        try:
            output = await self._dispatcher(method)(rows)
        except ServiceUnavailable as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)
        except Exception as exc:  # noqa: BLE001 - a failed batch answers 500 with its reason, as BentoML's routes do
            log.exception("array route %s failed", method)
            return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)
        body, headers = encode(output)
        return Response(body, headers=headers)

    def _dispatcher(self, method: str) -> Any:
        """The method's batching dispatcher, made in the running event loop on its first call."""
        dispatched = self._dispatched.get(method)
        if dispatched is None:
            dispatcher = CorkDispatcher(self.max_latency_ms, self.max_batch_size, get_batch_size=len, batch_dim=(0, 0),
                                        fallback=lambda: ServiceUnavailable("runner overloaded: batch queue full"))

            async def run_batch(batches: Sequence[np.ndarray]) -> list[np.ndarray]:
                service = bentoml.get_current_service()
                batch = np.concatenate(batches)
                batch_sizes().labels(runner_name=type(service).__name__, method_name=method).observe(len(batch))
                output = getattr(service, method).local(batch)  # `.local`: not the service's self-proxy
                if inspect.isawaitable(output):
                    output = await output
                return np.split(output, np.cumsum([len(rows) for rows in batches])[:-1])

            dispatched = self._dispatched[method] = _raising(dispatcher(run_batch))
        return dispatched


def _raising(dispatch: Any) -> Any:
    """The dispatcher answers an overload with its fallback's value; raise it instead."""
    async def call(rows: np.ndarray) -> np.ndarray:
        output = await dispatch(rows)
        if isinstance(output, Exception):
            raise output
        return output
    return call


@functools.cache
def batch_sizes() -> Any:
    """Rows per batch the array routes ran, by runner and method (Prometheus, on the service's /metrics)."""
    return BentoMLContainer.metrics_client.get().Histogram(
        namespace="neuronova", name="runner_batch_rows", documentation="Rows per batch an array route ran",
        labelnames=["runner_name", "method_name"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, float("inf")))


class ArrayRouteClient:
    """Calls a runner's array routes over the BentoML client's own connection pool to that runner (`runner`: the
    `bentoml.depends` handle). `methods` is empty for a runner in this process (BentoML's development mode, tests),
    whose methods are called directly."""

    def __init__(self, runner: Any, methods: Sequence[str]) -> None:
        self.runner = runner
        remote = isinstance(getattr(runner, "to_async", None), AsyncClient)
        self.methods = frozenset(methods) if remote else frozenset()

    async def call(self, method: str, rows: np.ndarray) -> np.ndarray:
        """The runner's `method` on `rows`; a failure raises the BentoMLException BentoML's own client would."""
        session = await self.runner.to_async._session_manager.get_session()  # BentoML 1.4.40's pool to this runner
        body, headers = encode(rows)
        async with session.post(f"{PATH}/{method}", data=body, headers=headers) as response:
            if response.status != 200:
                raise await map_exception(response)
            return decode(await response.read(), response.headers)
