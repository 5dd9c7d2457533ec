"""One runner call for the rows of many concurrent requests: the API worker's side of batching.

Every runner call is a full BentoML request cycle in both processes (HTTP over the runner's socket, pickling, the
ASGI stack and OpenTelemetry spans): ~3 ms of CPU for a model that costs 0.3 ms (docs/performance.md, profile). The
runner's adaptive batching merges calls only after paying that cycle for each. Here a worker sends a lone request at
once; requests that arrive while its call is in flight wait for that call to return and then go together, as one
call of up to the runner method's `max_batch_size` rows. No timer: a request waits only behind work in flight, as it
would in the runner's queue.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np

Send = Callable[[np.ndarray], Awaitable[np.ndarray]]

IN_FLIGHT = 1
"""Calls of one method a worker keeps in flight: while one runs, the next batch gathers (each API worker adds one,
and the runner's own batching merges what the workers send at once)."""


def batched_methods(runner_service: Any) -> dict[str, int]:
    """The batchable methods of a runner service (a `@bentoml.service` class) with their `max_batch_size`."""
    return {name: api.max_batch_size for name, api in runner_service.apis.items() if api.batchable}


class Coalescer:
    """Joins concurrent calls of one row-wise runner method (rows along axis 0, each output row the answer to its input
    row) into one call per batch; a failed call fails every request in it, as a failed batch does in the runner."""

    def __init__(self, send: Send, max_rows: int, in_flight: int = IN_FLIGHT) -> None:
        self.send = send
        self.max_rows = max_rows
        self.in_flight = in_flight
        self._running = 0
        self._queue: collections.deque[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = collections.deque()

    async def __call__(self, batch: np.ndarray) -> np.ndarray:
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.append((batch, future))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        while self._running < self.in_flight and self._queue:
            self._running += 1
            asyncio.get_running_loop().create_task(self._run(self._take()))

    def _take(self) -> list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]:
        """The oldest queued requests that fit in one call: same row shape and dtype (a model switch may change
        them), at most `max_rows` rows (a request larger than that goes alone); cancelled ones are dropped."""
        first = self._queue.popleft()
        taken, rows, kind = [first], len(first[0]), (first[0].shape[1:], first[0].dtype)
        kept: collections.deque[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = collections.deque()
        while self._queue:
            batch, future = self._queue.popleft()
            if future.done():
                continue
            if (batch.shape[1:], batch.dtype) == kind and rows + len(batch) <= self.max_rows:
                taken.append((batch, future))
                rows += len(batch)
            else:
                kept.append((batch, future))
        self._queue = kept
        return taken

    async def _run(self, requests: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]) -> None:
        try:
            live = [(batch, future) for batch, future in requests if not future.done()]
            if not live:
                return
            try:
                merged = live[0][0] if len(live) == 1 else np.concatenate([batch for batch, _ in live])
                output = await self.send(merged)
            except Exception as exc:  # noqa: BLE001 - handed to each caller, who maps it to the error schema
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                return
            start = 0
            for batch, future in live:
                if not future.done():
                    future.set_result(output[start:start + len(batch)])
                start += len(batch)
        finally:
            self._running -= 1
            self._dispatch()


def coalescers(send: Callable[[str], Send], limits: Mapping[str, int]) -> dict[str, Coalescer]:
    """A Coalescer per batchable method (`limits`: method name → max rows), each sending with `send(method)`."""
    return {method: Coalescer(send(method), max_rows) for method, max_rows in limits.items()}
