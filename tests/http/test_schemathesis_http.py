"""Schemathesis against the served app's own OpenAPI document (`/docs.json`, completed by `api/openapi.py`), on every
operation in it: the JSON and the multipart routes (CT, the MRI task routes, `/update_model`), the task and PACS
routes, the probes. Each operation gets `EXAMPLES` generated requests in positive mode (schema-valid) and, where it
has a schema-invalid form (a body, or a query parameter: a path of plain strings has none), `EXAMPLES` in negative
mode, with an admin token (it may call every route; `/update_model` and `/pacs/*` refuse others with 403).

Every response passes schemathesis' checks: no 5xx (`not_a_server_error`), a documented status
(`status_code_conformance`), the declared content type (`content_type_conformance`) and body
(`response_schema_conformance`: every error is the SPEC.md body, `ErrorResponse`), and a schema-invalid request is
refused with a 4xx (`negative_data_rejection`). Found and fixed with it (#24): a 500 from model-store reads while a
worker imported the MRI pipeline (`core/store.py`), MRI submissions BentoML stored as tasks before validating them
(`api/uploads.py`), and a document that declared neither the error bodies nor `null`s, 202s and task bodies the
routes answer.

Numbers (2 cores, the session's served instance): 23 operations, 13 of them with a negative form; up to 60
examples each way (an operation without parameters has one request): about 1,800 requests in about a minute.

`negative_data_rejection` is kept honest by `valid_as_sent`: a request schemathesis meant as invalid, but which is
valid as it went over the wire, may be accepted."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import httpx
import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from python_multipart.multipart import MultipartParser, parse_options_header
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import AcceptedNegativeData, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.http.conftest import make_token

EXAMPLES = 60
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
TASK_DEADLINE_S = 120
MULTIPART = {"/predict/ct_classification", "/predict/mri_segmentation", "/predict/mri_segmentation/submit",
             "/update_model"}
ADMIN = {"Authorization": f"Bearer {make_token(role='admin', subject='schemathesis')}"}


@pytest.fixture(scope="module")
def api_schema(server_url: str):
    return schemathesis.openapi.from_url(f"{server_url}/docs.json", headers=ADMIN, timeout=30)


def operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


def form_fields(body: bytes, content_type: str) -> tuple[dict[str, bytes], Counter]:
    """A multipart body's fields (the last value of each) and its file parts per field, as the server reads them."""
    boundary = parse_options_header(content_type)[1][b"boundary"]
    fields: dict[str, bytes] = {}
    files: Counter = Counter()
    part: dict[str, Any] = {}

    def header_field(data: bytes, start: int, end: int) -> None:
        part["field"] = part.get("field", b"") + data[start:end]

    def header_value(data: bytes, start: int, end: int) -> None:
        part["value"] = part.get("value", b"") + data[start:end]

    def header_end() -> None:
        if part.pop("field", b"").lower() == b"content-disposition":
            part["disposition"] = part.get("value", b"")
        part.pop("value", None)

    def headers_finished() -> None:
        options = parse_options_header(part.pop("disposition", b""))[1]
        part["name"] = options.get(b"name", b"").decode("utf-8", "replace")
        part["file"] = b"filename" in options
        part["data"] = b""

    def part_data(data: bytes, start: int, end: int) -> None:
        part["data"] += data[start:end]

    def part_end() -> None:
        if part["file"]:
            files[part["name"]] += 1
        else:
            fields[part["name"]] = part["data"]

    parser = MultipartParser(boundary, {"on_header_field": header_field, "on_header_value": header_value,
                                        "on_header_end": header_end, "on_headers_finished": headers_finished,
                                        "on_part_data": part_data, "on_part_end": part_end})
    parser.write(body)
    return fields, files


def valid_as_sent(spec: dict[str, Any], operation, request) -> bool:
    """Whether the body a request really carried is valid for the operation's declared schema: a multipart form read
    as the server reads it (a field's last value, JSON where it parses; a file part as a binary string), JSON as
    JSON. Schemathesis' negative mode can mutate a body into a form that serialization makes valid again (an empty
    array is no part at all) or that another `anyOf` branch allows (`null`); its `negative_data_rejection` then
    blames the server for accepting a valid request."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip()
    declared = operation.definition.raw.get("requestBody", {}).get("content", {}).get(media)
    if declared is None or not request.body:
        return False
    body = request.body if isinstance(request.body, bytes) else request.body.encode()
    if media == "multipart/form-data":
        fields, files = form_fields(body, content_type)
        data: dict[str, Any] = {}
        for name, raw in fields.items():
            try:
                data[name] = json.loads(raw)
            except ValueError:
                data[name] = raw.decode("utf-8", "replace")
        properties = declared["schema"].get("properties", {})
        for name, count in files.items():
            data[name] = [""] * count if properties.get(name, {}).get("type") == "array" else ""
    else:
        try:
            data = json.loads(body)
        except ValueError:
            return False
    validator = jsonschema.Draft202012Validator({**declared["schema"], "components": spec["components"]})
    return validator.is_valid(data)


def has_negative_form(operation) -> bool:
    """A body or a query parameter can be made schema-invalid; a path of unconstrained strings cannot."""
    return bool(operation.definition.raw.get("requestBody")) or any(
        parameter.get("in") == "query" for parameter in operation.definition.raw.get("parameters", []))


def test_the_document_covers_every_route(api_schema) -> None:
    found = {(op.method.upper(), op.path) for op in operations(api_schema)}
    assert {("POST", "/predict/ct_classification"), ("POST", "/predict/mri_segmentation"),
            ("POST", "/predict/mri_segmentation/submit"), ("POST", "/update_model"), ("POST", "/pacs/notify"),
            ("GET", "/pacs/jobs"), ("GET", "/pacs/jobs/{job_id}"), ("POST", "/feedback"), ("POST", "/xai/explain"),
            ("POST", "/predict/biomarker_prediction"), ("GET", "/task/{task_id}"), ("DELETE", "/task/{task_id}"),
            ("GET", "/health"), ("GET", "/model_info")} <= found
    multipart = {op.path for op in operations(api_schema)
                 if "multipart/form-data" in op.definition.raw.get("requestBody", {}).get("content", {})}
    assert multipart == MULTIPART


def fuzz(spec: dict[str, Any], operation, mode: GenerationMode, server_url: str, tasks: list[str],
         failures: list[str]) -> Counter:
    """EXAMPLES generated requests of `mode` to `operation`, each response checked (the first failing example's
    report is added to `failures`); the statuses seen."""
    statuses: Counter = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        response = case.call(base_url=server_url, headers=ADMIN, timeout=60)
        statuses[response.status_code] += 1
        if response.status_code in (200, 202) and "task_id" in response.text[:200]:
            tasks.append(response.json()["task_id"])
        try:
            case.validate_response(response, checks=CHECKS, headers=ADMIN)
        except FailureGroup as group:
            real = [failure for failure in group.exceptions if not (
                isinstance(failure, AcceptedNegativeData) and valid_as_sent(spec, operation, response.request))]
            if real:
                raise

    try:
        run()
    except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - schemathesis' report (FailureGroup) for the summary
        failures.append(f"{mode.value} {operation.method.upper()} {operation.path}: {exc}"[:3000])
    return statuses


def test_generated_requests_to_every_route_get_declared_answers(api_schema, server_url) -> None:
    with httpx.Client(base_url=server_url, headers=ADMIN, timeout=60) as client:
        spec = client.get("/docs.json").json()
        served = {name: model["version"] for name, model in client.get("/health").json()["models"].items()}
        tasks: list[str] = []
        failures: list[str] = []
        seen: dict[str, Counter] = {}
        started = time.monotonic()
        try:
            for operation in operations(api_schema):
                modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if has_negative_form(operation) else [])
                for mode in modes:
                    seen[f"{mode.value} {operation.method.upper()} {operation.path}"] = fuzz(
                        spec, operation, mode, server_url, tasks, failures)
        finally:
            for task_id in tasks:  # generated MRI studies: cancelled, so that no later test finds the queue full
                client.delete(f"/task/{task_id}")
            deadline = time.monotonic() + TASK_DEADLINE_S
            while any(client.get(f"/task/{task_id}").json().get("status") in ("pending", "processing")
                      for task_id in tasks):
                assert time.monotonic() < deadline, "generated MRI tasks did not finish"
                time.sleep(0.5)
        # A generated request never switched a model: model_id is free text in the schema, no example names one.
        assert {name: model["version"] for name, model in client.get("/health").json()["models"].items()} == served
    requests = sum(sum(counter.values()) for counter in seen.values())
    print(f"\nschemathesis: {len(seen)} operation×mode runs, {requests} requests in {time.monotonic() - started:.0f} s")
    for label, counter in seen.items():
        print(f"  {label}: {dict(sorted(counter.items()))}")
    assert not failures, "\n\n".join(failures)
    assert len([label for label in seen if label.startswith("negative")]) == 13
    for path in MULTIPART:  # the multipart routes were really fuzzed with invalid forms, and refused them
        assert any(400 <= status < 500 for status in seen[f"negative POST {path}"]), path
