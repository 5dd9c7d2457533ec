"""`/docs.json` of the real app says what the routes answer (`api/openapi.py`): OpenAPI 3.1 with the models' own
schemas, the SPEC.md error body for every error, the task routes' real answers; and the service's real answers
match it."""

from __future__ import annotations

import jsonschema
import pytest
import schemathesis

from api.auth import PUBLIC_PATHS
from api.errors import UNTOUCHED_PATHS
from api.openapi import error_schema

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


@pytest.fixture(scope="module")
def spec(inprocess_client) -> dict:
    response = inprocess_client.get("/docs.json")
    assert response.status_code == 200 and response.headers["content-length"] == str(len(response.content))
    return response.json()


def body_schema(spec: dict, path: str, method: str, status: str) -> dict:
    return spec["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]


def test_every_error_of_every_route_is_the_spec_error_body(spec) -> None:
    assert spec["openapi"] == "3.1.0"
    for path, item in spec["paths"].items():
        if path in UNTOUCHED_PATHS:
            continue
        for method in item:
            for status in ("400", "404", "413", "422", "429", "500", "503") + (() if path in PUBLIC_PATHS else ("401",)):
                assert body_schema(spec, path, method, status) == ERROR_REF, (method, path, status)
    assert body_schema(spec, "/update_model", "post", "403") == ERROR_REF
    assert body_schema(spec, "/pacs/jobs", "get", "403") == ERROR_REF
    assert "403" not in spec["paths"]["/predict/ct_classification"]["post"]["responses"]
    for name in ("InvalidArgument", "HTTPValidationError"):  # BentoML's and FastAPI's error bodies: never answered
        assert name not in spec["components"]["schemas"]
    health = spec["paths"]["/health"]["get"]["responses"]
    assert body_schema(spec, "/health", "get", "503") == body_schema(spec, "/health", "get", "200") == {
        "$ref": "#/components/schemas/HealthResponse"} and set(health) == {"200", "503"}


def test_bodies_are_the_models_schemas_with_null_and_alternatives(spec) -> None:
    ct = spec["paths"]["/predict/ct_classification"]["post"]
    form = ct["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert {"type": "null"} in form["request_id"]["anyOf"]
    assert {"type": "string"} in form["xai_methods"]["anyOf"]  # list[str] | str
    assert form["image"] == {"format": "binary", "title": "Image", "type": "string"}
    assert {"type": "null"} in body_schema(spec, "/predict/ct_classification", "post", "200")["properties"]["xai"]["anyOf"]
    mri = spec["paths"]["/predict/mri_segmentation/submit"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert mri["schema"]["properties"]["image"]["minItems"] == 1


def test_the_task_routes_declare_what_they_answer(spec) -> None:
    route = "/predict/mri_segmentation"
    submitted = {"$ref": "#/components/schemas/TaskSubmitted"}
    assert set(spec["paths"][route]["post"]["responses"]) >= {"202"} and "200" not in spec["paths"][route]["post"]["responses"]
    assert body_schema(spec, route, "post", "202") == submitted
    assert body_schema(spec, f"{route}/submit", "post", "200") == body_schema(spec, f"{route}/retry", "post", "200") == submitted
    assert body_schema(spec, f"{route}/status", "get", "200") == {"$ref": "#/components/schemas/BentoMLTaskStatus"}
    ours = spec["components"]["schemas"]["TaskStatusResponse"]
    assert "progress" in ours["properties"] and body_schema(spec, "/task/{task_id}", "get", "200") == {
        "$ref": "#/components/schemas/TaskStatusResponse"}
    assert body_schema(spec, f"{route}/get", "get", "409") == ERROR_REF


def test_real_error_answers_match_the_declared_error_body(inprocess_client, spec) -> None:
    validator = jsonschema.Draft202012Validator(error_schema())
    answers = [
        inprocess_client.get("/task/unknown"),
        inprocess_client.post("/predict/ct_classification", data={"patient_id": "P1"}),
        inprocess_client.post("/predict/mri_segmentation/submit", content=b"", headers={"content-type": "text/plain"}),
        inprocess_client.get("/model_info", headers={"Authorization": "Bearer nope"}),
        inprocess_client.get("/pacs/jobs", params={"limit": "0"}),
    ]
    assert [answer.status_code for answer in answers] == [404, 400, 400, 401, 403]
    for answer in answers:
        validator.validate(answer.json())
    assert schemathesis.openapi.from_dict(spec).get_all_operations()  # the document loads
