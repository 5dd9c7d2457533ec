"""Schemathesis against the served app's own OpenAPI spec (`/docs.json`): generated valid and invalid requests to the
JSON routes never get a 5xx, and every 4xx is in the SPEC error schema."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

JSON_BODIES = [("/predict/biomarker_prediction", "POST"), ("/feedback", "POST"), ("/xai/explain", "POST")]
READS = [
    ("/model_info", "GET"),
    ("/health", "GET"),
    ("/task/{task_id}", "GET"),
    ("/predict/task_status/{task_id}", "GET"),
    ("/predict/mri_segmentation/status", "GET"),
]
CASES = [(p, m, GenerationMode.POSITIVE) for p, m in JSON_BODIES + READS] + [
    (p, m, GenerationMode.NEGATIVE) for p, m in JSON_BODIES]
"""(path, method, mode): schema-valid requests everywhere; schema-invalid bodies where there is a body (a string
path or query id has no schema-invalid form)."""
EXAMPLES_PER_MODE = 20
ERROR_KEYS = {"code", "message", "details", "timestamp"}


@pytest.fixture(scope="module")
def api_schema(server_url: str, auth_headers: dict[str, str]):
    return schemathesis.openapi.from_url(f"{server_url}/docs.json", headers=auth_headers, timeout=30)


def check(response, label: str) -> None:
    assert response.status_code < 500, f"{label}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        body = response.json()
        assert body["success"] is False and ERROR_KEYS <= body["error"].keys(), f"{label}: {response.text[:300]}"


@pytest.mark.parametrize(("path", "method", "mode"), CASES, ids=[f"{g.value} {m} {p}" for p, m, g in CASES])
def test_generated_requests_get_no_5xx_and_schema_4xx(api_schema, server_url, auth_headers, path, method, mode) -> None:
    strategy = api_schema[path][method].as_strategy(generation_mode=mode)
    calls = []

    @settings(max_examples=EXAMPLES_PER_MODE, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case) -> None:
        response = case.call(base_url=server_url, headers=auth_headers, timeout=60)
        calls.append(response.status_code)
        check(response, f"{method} {path} {case.body!r:.200} {case.query!r:.100}")

    run()
    assert calls
