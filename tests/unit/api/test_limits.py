"""Body size limits before the body is read whole, and per-client rate limits with Retry-After."""

from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from api.limits import BodyLimitMiddleware, RateLimitMiddleware, route_body_limit
from core.settings import LimitSettings, RateLimitSettings

LIMITS = LimitSettings(ct_max_bytes=1000, mri_max_bytes=5000, json_max_bytes=100)


async def echo_size(request: Request) -> JSONResponse:
    return JSONResponse({"size": len(await request.body())})


def app() -> Starlette:
    return Starlette(routes=[Route(p, echo_size, methods=["POST"]) for p in ("/predict/ct_classification", "/other")])


def test_route_limits():
    assert route_body_limit("/predict/ct_classification", LIMITS) > 1000
    assert route_body_limit("/predict/mri_segmentation/submit", LIMITS) > 5000
    assert route_body_limit("/predict/biomarker_prediction", LIMITS) == 100


def test_a_model_export_has_a_limit_of_its_own() -> None:
    """The shipped MRI export (1.6 MB) used to get the 1 MiB JSON limit's 413; exports get gigabytes now."""
    defaults = LimitSettings()
    assert route_body_limit("/update_model", defaults) >= 2 * 2**30
    routes = [Route("/update_model", echo_size, methods=["POST"])]
    client = TestClient(BodyLimitMiddleware(Starlette(routes=routes), limits=defaults))
    export = (Path(__file__).resolve().parents[3] / "demo_models" / "neuronova-mri.bentomodel").read_bytes()
    assert len(export) > defaults.json_max_bytes
    assert client.post("/update_model", content=export).json() == {"size": len(export)}


def test_declared_length_over_limit_is_413_at_once():
    client = TestClient(BodyLimitMiddleware(app(), limits=LIMITS))
    response = client.post("/other", content=b"x" * 101)
    assert response.status_code == 413 and response.json()["error"]["code"] == "IMAGE_TOO_LARGE"
    assert client.post("/other", content=b"x" * 100).json() == {"size": 100}


def test_chunked_body_over_limit_is_413():
    client = TestClient(BodyLimitMiddleware(app(), limits=LIMITS))

    def chunks():
        for _ in range(5):
            yield b"y" * 50

    response = client.post("/other", content=chunks())
    assert response.status_code == 413 and response.json()["error"]["code"] == "IMAGE_TOO_LARGE"


@pytest.fixture()
def limited() -> TestClient:
    settings = RateLimitSettings(default_per_minute=3, per_route_per_minute={"/predict/ct_classification": 1})
    return TestClient(RateLimitMiddleware(app(), rate_limit=settings, exempt_paths=frozenset({"/health"})))


def test_rate_limit_per_route_with_retry_after(limited):
    assert limited.post("/predict/ct_classification").status_code == 200
    refused = limited.post("/predict/ct_classification")
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "RATE_LIMIT_EXCEEDED"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert [limited.post("/other").status_code for _ in range(4)] == [200, 200, 200, 429]


def test_rate_limit_disabled():
    client = TestClient(RateLimitMiddleware(app(), rate_limit=RateLimitSettings(enabled=False, default_per_minute=1), exempt_paths=frozenset()))
    assert [client.post("/other").status_code for _ in range(3)] == [200, 200, 200]
