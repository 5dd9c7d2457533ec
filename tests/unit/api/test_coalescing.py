"""The API worker's side of batching: concurrent runner calls go as one, each caller gets its own rows back."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pipelines.coalescing import Coalescer, batched_methods
from runners.biomarker import BiomarkerModel
from runners.ct import MAX_BATCH, CTClassifier


class Runner:
    """A row-wise runner method (each output row = input row × 10) that records the batches it was sent."""

    def __init__(self, seconds: float = 0.05, fail: bool = False) -> None:
        self.seconds, self.fail = seconds, fail
        self.batches: list[np.ndarray] = []

    async def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.batches.append(rows)
        await asyncio.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("model failed")
        return rows * 10


def rows(value: float, n: int = 1, width: int = 3) -> np.ndarray:
    return np.full((n, width), value, np.float32)


def test_a_lone_call_goes_at_once_and_calls_that_arrive_while_it_runs_go_together():
    runner = Runner()
    coalescer = Coalescer(runner, max_rows=32)

    async def scenario():
        first = asyncio.ensure_future(coalescer(rows(1)))
        await asyncio.sleep(0.01)
        assert len(runner.batches) == 1  # sent without waiting for company
        rest = [asyncio.ensure_future(coalescer(rows(v, n=2))) for v in (2, 3, 4)]
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(scenario())
    assert [len(b) for b in runner.batches] == [1, 6]
    np.testing.assert_array_equal(first, rows(10))
    for value, out in zip((2, 3, 4), rest):
        np.testing.assert_array_equal(out, rows(value * 10, n=2))


def test_a_batch_never_exceeds_max_rows_and_other_shapes_go_separately():
    runner = Runner()
    coalescer = Coalescer(runner, max_rows=4)

    async def scenario():
        blocker = asyncio.ensure_future(coalescer(rows(0)))
        await asyncio.sleep(0.01)
        calls = [asyncio.ensure_future(coalescer(r)) for r in (*(rows(v, n=2) for v in (1, 2, 3)), rows(9, width=5))]
        return await blocker, await asyncio.gather(*calls)

    _, outs = asyncio.run(scenario())
    assert [b.shape for b in runner.batches] == [(1, 3), (4, 3), (2, 3), (1, 5)]
    np.testing.assert_array_equal(outs[2], rows(30, n=2))
    np.testing.assert_array_equal(outs[3], rows(90, width=5))


def test_a_failed_call_fails_every_request_in_it_and_the_next_ones_still_run():
    runner = Runner(fail=True)
    coalescer = Coalescer(runner, max_rows=32)

    async def scenario():
        results = await asyncio.gather(*(coalescer(rows(v)) for v in range(3)), return_exceptions=True)
        runner.fail = False
        return results, await coalescer(rows(5))

    results, after = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) for r in results)
    np.testing.assert_array_equal(after, rows(50))


def test_a_cancelled_request_is_not_sent():
    runner = Runner()
    coalescer = Coalescer(runner, max_rows=32)

    async def scenario():
        blocker = asyncio.ensure_future(coalescer(rows(0)))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(coalescer(rows(7)))
        kept = asyncio.ensure_future(coalescer(rows(8)))
        await asyncio.sleep(0)
        gone.cancel()
        await blocker
        return await kept

    np.testing.assert_array_equal(asyncio.run(scenario()), rows(80))
    assert [b[0, 0] for b in runner.batches] == [0, 8]


@pytest.mark.parametrize(("runner", "expected"), [(CTClassifier, {"predict": MAX_BATCH, "explain": 16, "occlude": 4}),
                                                  (BiomarkerModel, {"predict": 64, "explain": 64})])
def test_the_coalesced_methods_are_the_runners_batchable_ones_with_their_limits(runner, expected):
    assert batched_methods(runner) == expected
