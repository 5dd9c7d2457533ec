"""The array route into a runner: arrays survive the trip bit for bit, concurrent calls are batched without mixing
rows, and bad input, failures and overload answer with BentoML's statuses."""

from __future__ import annotations

import asyncio

import bentoml
import httpx
import numpy as np
import pytest

from runners import array_route
from runners.array_route import ArrayRouteClient, ArrayRoutes, decode, encode


@pytest.mark.parametrize("array", [np.arange(12, dtype=np.float32).reshape(3, 4),
                                   np.random.default_rng(0).normal(size=(2, 5, 3)),
                                   np.zeros((0, 16), np.float32)])
def test_an_array_comes_back_bit_for_bit(array):
    body, headers = encode(array)
    back = decode(body, headers)
    assert back.dtype == array.dtype and back.shape == array.shape and back.tobytes() == array.tobytes()


@pytest.mark.parametrize(("headers", "body", "named"), [
    ({"x-shape": "2,2"}, b"\0" * 16, "x-dtype"),
    ({"x-dtype": "<f4", "x-shape": "two"}, b"\0" * 16, "x-shape"),
    ({"x-dtype": "<i4", "x-shape": "2,2"}, b"\0" * 16, "not an array this route carries"),
    ({"x-dtype": ">f4", "x-shape": "2,2"}, b"\0" * 16, "not an array this route carries"),
    ({"x-dtype": "<f4", "x-shape": "1,1,1,1,1"}, b"\0" * 4, "not an array this route carries"),
    ({"x-dtype": "<f4", "x-shape": "2,2"}, b"\0" * 12, "needs 16 bytes, the body has 12"),
])
def test_a_body_that_does_not_fit_its_headers_is_refused(headers, body, named):
    with pytest.raises(ValueError, match=named):
        decode(body, headers)


def test_an_array_of_another_type_is_not_sent():
    with pytest.raises(ValueError, match="int64"):
        encode(np.arange(3))


class Method:
    """A runner method as BentoML exposes it: `.local` is the in-process caller."""

    def __init__(self, compute, delay_s: float = 0.0) -> None:
        self.batches: list[int] = []
        self.compute, self.delay_s = compute, delay_s

    async def local(self, rows: np.ndarray) -> np.ndarray:
        self.batches.append(len(rows))
        await asyncio.sleep(self.delay_s)
        return self.compute(rows)


class Runner:
    def __init__(self, **methods: Method) -> None:
        self.__dict__.update(methods)


def post(routes: ArrayRoutes, runner: Runner, monkeypatch, calls: list[tuple[str, bytes, dict[str, str]]]):
    """Send `calls` (method, body, headers) to the routes concurrently; their responses in order."""
    monkeypatch.setattr(bentoml, "get_current_service", lambda: runner)

    async def send_all():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=routes.app), base_url="http://runner") as client:
            return await asyncio.gather(*(client.post(f"/{method}", content=body, headers=headers)
                                          for method, body, headers in calls))
    return asyncio.run(send_all())


def test_concurrent_calls_are_batched_and_each_gets_its_own_rows(monkeypatch):
    doubled = Method(lambda rows: rows * 2, delay_s=0.05)
    rows = [np.full((1 + i % 2, 3), i, np.float32) for i in range(12)]
    responses = post(ArrayRoutes(["double"], 64, 10_000), Runner(double=doubled), monkeypatch,
                     [("double", *encode(r)) for r in rows])
    for sent, response in zip(rows, responses):
        assert response.status_code == 200
        np.testing.assert_array_equal(decode(response.content, response.headers), sent * 2)
    assert sum(doubled.batches) == sum(len(r) for r in rows) and len(doubled.batches) < len(rows)


def test_bad_input_unknown_methods_and_failures_answer_as_bentoml_does(monkeypatch):
    def fail(rows):
        raise RuntimeError("model file vanished")

    routes = ArrayRoutes(["fail"], 64, 10_000)
    body, headers = encode(np.zeros((1, 3), np.float32))
    unknown, bad, failed = post(routes, Runner(fail=Method(fail)), monkeypatch,
                                [("predict", body, headers), ("fail", body[:4], headers), ("fail", body, headers)])
    assert unknown.status_code == 404 and "predict" in unknown.json()["error"]
    assert bad.status_code == 400 and "needs 12 bytes" in bad.json()["error"]
    assert failed.status_code == 500 and failed.json()["error"] == "RuntimeError: model file vanished"


def test_requests_that_outwait_the_batch_latency_are_shed_with_503(monkeypatch):
    slow = Method(lambda rows: rows, delay_s=0.2)
    responses = post(ArrayRoutes(["slow"], 1, 50), Runner(slow=slow), monkeypatch,
                     [("slow", *encode(np.zeros((1, 2), np.float32)))] * 6)
    statuses = [r.status_code for r in responses]
    assert 200 in statuses and 503 in statuses, statuses
    assert all("overloaded" in r.json()["error"] for r in responses if r.status_code == 503)


def test_batches_are_counted_on_the_metrics(monkeypatch):
    observed = []

    class Histogram:
        def labels(self, **labels):
            return type("Child", (), {"observe": lambda _, rows: observed.append((labels["method_name"], rows))})()

    monkeypatch.setattr(array_route, "batch_sizes", lambda: Histogram())
    post(ArrayRoutes(["same"], 64, 10_000), Runner(same=Method(lambda rows: rows)), monkeypatch,
         [("same", *encode(np.zeros((3, 2), np.float32)))])
    assert observed == [("same", 3)]


def test_a_runner_in_this_process_is_called_directly():
    assert ArrayRouteClient(Runner(), ["predict"]).methods == frozenset()
