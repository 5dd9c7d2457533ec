"""The runners' batching policy: BentoML's dispatcher, with no learned wait (runners/batching.py)."""

from __future__ import annotations

import asyncio
import time
from statistics import median

import pytest
from bentoml._internal.marshal import dispatcher

from runners.batching import NoWaitOptimizer, never_hold_lone_requests


@pytest.fixture(autouse=True)
def no_wait_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy installed (as api.bentoml_patches.install does in a server), BentoML's class put back after."""
    monkeypatch.setattr(dispatcher, "Optimizer", dispatcher.Optimizer)
    never_hold_lone_requests()


MODEL_SECONDS = 0.02


def test_the_optimizer_learns_the_models_cost_but_no_wait() -> None:
    optimizer = dispatcher.Optimizer(max_latency=10.0)
    assert isinstance(optimizer, NoWaitOptimizer)
    for n in (1, 2, 4, 8) * 3:
        optimizer.o_stat.append((n, 0.001 + 0.002 * n, 0.5))  # batches that waited 0.5 s behind a busy model

    optimizer.trigger_refresh()

    assert optimizer.wait == 0.0
    assert abs(optimizer.o_a - 0.002) < 1e-6 and abs(optimizer.o_b - 0.001) < 1e-6


async def _serve() -> tuple[list[int], list[float], list[float]]:
    sizes: list[int] = []

    async def model(batch):
        sizes.append(len(batch))
        await asyncio.sleep(MODEL_SECONDS)
        return list(batch)

    cork = dispatcher.CorkDispatcher(max_latency_in_ms=10_000, max_batch_size=32, fallback=lambda: None,
                                     get_batch_size=lambda _: 1)
    call = cork(model)

    async def timed() -> float:
        started = time.perf_counter()
        await call(1)
        return time.perf_counter() - started

    before = [await timed() for _ in range(12)]  # the dispatcher's own training, one request at a time
    for _ in range(6):  # 48 batches that queued behind the busy model (the optimizer keeps its last 50)
        await asyncio.gather(*(call(i) for i in range(256)))
    cork.optimizer.trigger_refresh()  # as BentoML does every 5 s during a longer burst
    after = [await timed() for _ in range(10)]
    cork.shutdown()
    return sizes, before, after


def test_load_still_forms_batches_and_a_lone_request_after_a_burst_is_not_held() -> None:
    sizes, before, after = asyncio.run(_serve())

    assert max(sizes) >= 16  # requests queued behind the busy model leave together
    # No learned wait on lone requests: after the burst they take what they took before it (BentoML's own estimate
    # held them ~88 ms against ~20 ms here), compared with each other so that a slow machine slows both alike.
    assert median(after) < 1.5 * median(before) + 0.005
