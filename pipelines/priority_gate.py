"""The slot gate of an API worker's MRI tasks (embedded mode): urgent tasks waiting are let in before routine ones."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from core.priority import RANK, Priority


class PriorityGate:
    """At most `slots` holders at once; waiters are let in urgent first, first-in first-out within a priority.

    An asyncio.Semaphore with an ordered wait queue (neither asyncio nor anyio offers one: anyio's CapacityLimiter
    is FIFO only). A freed slot is handed straight to the next waiter, so a newcomer never overtakes the queue.
    Cancellation safe: a waiter cancelled while queued leaves the queue; one cancelled just after it was handed a
    slot passes the slot on; a holder's slot is freed however its work ends. One event loop only (not thread-safe).
    """

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("a gate needs at least one slot")
        self._free = slots
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        """A heap of (-rank, arrival number, the waiter's future)."""
        self._arrivals = itertools.count()

    @property
    def free(self) -> int:
        """How many slots nobody holds."""
        return self._free

    @property
    def waiting(self) -> int:
        """How many are queued for a slot."""
        return len(self._waiting)

    @asynccontextmanager
    async def slot(self, priority: Priority) -> AsyncIterator[None]:
        """Hold one slot for the block, after every waiter of a higher priority and the earlier ones of the same."""
        await self._acquire(priority)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, priority: Priority) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        entry = (-RANK[priority], next(self._arrivals), asyncio.get_running_loop().create_future())
        heapq.heappush(self._waiting, entry)
        try:
            await entry[2]
        except asyncio.CancelledError:
            if entry[2].done() and not entry[2].cancelled():  # handed a slot as it was cancelled: pass it on
                self._release()
            elif entry in self._waiting:
                self._waiting.remove(entry)
                heapq.heapify(self._waiting)
            raise

    def _release(self) -> None:
        """Hand the slot to the first waiter still waiting, else free it."""
        while self._waiting:
            _, _, waiter = heapq.heappop(self._waiting)
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1
