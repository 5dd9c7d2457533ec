"""Wall-clock budgets of task steps: a step that overruns its budget fails the task at once with a clear error.

The event loop is never blocked (heavy steps run in threads), so the deadline always fires. A thread cannot be
killed: its work goes on until it ends, which the decoding limits keep short (`preprocessing/archive.py`,
`preprocessing/dicom.py`), but the task is answered and the worker's shutdown does not wait for it (`api/shutdown.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from typing import TypeVar

from core.errors import InternalServerError

T = TypeVar("T")


class StepBudgetExceeded(InternalServerError):
    """A task step ran past its wall-clock budget (`NEURONOVA_LIMITS__TASK_STEP_BUDGET_SECONDS`)."""


async def within_budget(step: str, work: Awaitable[T], budgets: Mapping[str, float]) -> T:
    """Await `work`, failing with StepBudgetExceeded once the step's budget (seconds; none: unbounded) has passed."""
    seconds = budgets.get(step)
    if seconds is None:
        return await work
    try:
        return await asyncio.wait_for(work, seconds)
    except TimeoutError as exc:
        raise StepBudgetExceeded(f"the task's {step} step ran past its budget of {seconds:g} s",
                                 {"reason": "step_budget_exceeded", "step": step, "budget_seconds": seconds}) from exc


def scaled(budgets: Mapping[str, float], step: str, factor: float) -> dict[str, float]:
    """`budgets` with `step`'s budget (if it has one) multiplied by `factor` (a step doing `factor` times the work)."""
    return {**budgets, **({step: budgets[step] * factor} if step in budgets else {})}
