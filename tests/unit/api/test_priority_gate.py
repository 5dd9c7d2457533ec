"""The MRI slot gate of one API worker (core/priority.py): urgent waiters first, first-in first-out within a priority,
and no slot lost or doubled when a waiter is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from core.priority import RANK, Priority, priority_of
from pipelines.priority_gate import PriorityGate

T = TypeVar("T")


DEADLOCK_S = 30.0
"""A lost slot leaves a waiter waiting for ever: the scenarios fail after this instead of hanging the suite (a bound on
a deadlock, not a speed check)."""


def run(scenario: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(scenario, DEADLOCK_S))


async def queued(gate: PriorityGate, count: int) -> None:
    """Return once `count` waiters are queued at `gate` (each waiter queues within one turn of the loop)."""
    while gate.waiting < count:
        await asyncio.sleep(0)


class Holder:
    """Holds a slot until released: what a running MRI task is to the gate."""

    def __init__(self, gate: PriorityGate, priority: Priority = "routine") -> None:
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self.task = asyncio.create_task(self._hold(gate, priority))

    async def _hold(self, gate: PriorityGate, priority: Priority) -> None:
        async with gate.slot(priority):
            self.holding.set()
            await self.release.wait()


async def admitted_order(gate: PriorityGate, arrivals: list[tuple[str, Priority]]) -> list[str]:
    """Queue `arrivals` (name, priority) in order behind a holder of the gate's one slot, free it, and return the
    order in which they were let in."""
    holder = Holder(gate)
    await holder.holding.wait()
    order: list[str] = []

    async def wait_turn(name: str, priority: Priority) -> None:
        async with gate.slot(priority):
            order.append(name)

    waiters = []
    for index, (name, priority) in enumerate(arrivals):
        waiters.append(asyncio.create_task(wait_turn(name, priority)))
        await queued(gate, index + 1)  # arrivals in a known order
    holder.release.set()
    await asyncio.gather(holder.task, *waiters)
    return order


def test_an_urgent_task_overtakes_ten_routine_ones_waiting() -> None:
    arrivals: list[tuple[str, Priority]] = [(f"routine-{i}", "routine") for i in range(10)] + [("urgent", "urgent")]
    order = run(admitted_order(PriorityGate(1), arrivals))
    assert order == ["urgent"] + [f"routine-{i}" for i in range(10)]


def test_first_in_first_out_within_each_priority() -> None:
    arrivals: list[tuple[str, Priority]] = [("r0", "routine"), ("u0", "urgent"), ("r1", "routine"), ("u1", "urgent"),
                                            ("r2", "routine")]
    assert run(admitted_order(PriorityGate(1), arrivals)) == ["u0", "u1", "r0", "r1", "r2"]


def test_a_free_slot_is_taken_at_once_and_never_more_than_the_slots_run() -> None:
    async def scenario() -> tuple[int, int]:
        gate, running, most = PriorityGate(2), 0, 0
        release = asyncio.Event()

        async def work() -> None:
            nonlocal running, most
            async with gate.slot("routine"):
                running += 1
                most = max(most, running)
                await release.wait()
                running -= 1

        tasks = [asyncio.create_task(work()) for _ in range(5)]
        await queued(gate, 3)
        started = running
        release.set()
        await asyncio.gather(*tasks)
        return started, most

    assert run(scenario()) == (2, 2)


def test_a_cancelled_waiter_leaves_the_queue_and_the_slot_goes_to_the_next() -> None:
    async def scenario() -> tuple[list[str], int]:
        gate = PriorityGate(1)
        holder = Holder(gate)
        await holder.holding.wait()
        order: list[str] = []

        async def wait_turn(name: str, priority: Priority) -> None:
            async with gate.slot(priority):
                order.append(name)

        urgent = asyncio.create_task(wait_turn("urgent", "urgent"))
        routine = asyncio.create_task(wait_turn("routine", "routine"))
        await queued(gate, 2)
        urgent.cancel()
        with pytest.raises(asyncio.CancelledError):
            await urgent
        left = gate.waiting
        holder.release.set()
        await asyncio.gather(holder.task, routine)
        return order, left

    assert run(scenario()) == (["routine"], 1)


def test_a_waiter_cancelled_as_it_is_handed_the_slot_passes_it_on() -> None:
    """The holder frees its slot (handing it to the urgent waiter) and, in the same turn of the loop, the urgent
    waiter is cancelled: the slot must reach the routine waiter, not be lost or doubled."""

    async def scenario() -> tuple[list[str], int]:
        gate = PriorityGate(1)
        order: list[str] = []
        holding, release = asyncio.Event(), asyncio.Event()
        victims: list[asyncio.Task] = []

        async def wait_turn(name: str, priority: Priority) -> None:
            async with gate.slot(priority):
                order.append(name)

        async def hold_then_cancel() -> None:
            async with gate.slot("routine"):
                holding.set()
                await release.wait()
            victims[0].cancel()  # the slot was just handed to it, and it has not run since

        holder = asyncio.create_task(hold_then_cancel())
        await holding.wait()
        victims.append(asyncio.create_task(wait_turn("urgent", "urgent")))
        routine = asyncio.create_task(wait_turn("routine", "routine"))
        await queued(gate, 2)
        release.set()
        await asyncio.gather(holder, routine)
        with pytest.raises(asyncio.CancelledError):
            await victims[0]
        return order, gate.free

    assert run(scenario()) == (["routine"], 1)


def test_a_slot_is_freed_when_the_work_fails() -> None:
    async def scenario() -> None:
        gate = PriorityGate(1)
        with pytest.raises(RuntimeError):
            async with gate.slot("urgent"):
                raise RuntimeError("inference failed")
        assert gate.free == 1

    run(scenario())


def test_ranks_order_urgent_first_and_read_back() -> None:
    assert RANK["urgent"] > RANK["routine"]
    assert [priority_of(RANK[name]) for name in ("routine", "urgent")] == ["routine", "urgent"]
    with pytest.raises(ValueError):
        PriorityGate(0)
