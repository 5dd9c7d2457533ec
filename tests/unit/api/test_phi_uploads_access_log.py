"""PHI floor on patient ids, uploads that must not be URLs, and the JSON access log (small Starlette apps)."""

from __future__ import annotations

import io
import json
import logging
from datetime import date
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from api.access_log import (
    ACCESS_LOGGER,
    AccessLogMiddleware,
    JsonLineFormatter,
    route_model,
)
from api.metric_labels import EndpointLabels
from api.phi import DATE_FORMATS, PatientId, check_patient_id, looks_like_date
from api.uploads import MAX_FORM_BYTES, UploadGuardMiddleware, file_fields_by_path, task_inputs_by_path

PATIENT_ID = TypeAdapter(PatientId)

ANONYMISED = ["P123456", "P1", "P000001", "anon-7f3a9c", "SUBJ_0042", "1.2.840.10008", "A" * 64, "12345"]
IDENTIFYING = [
    "John Smith", "Smith^John", "SMITH^JOHN^^DR", "Smith, John", " P1", "P1\t", "1980-01-31", "19800131",
    "31.01.1980", "01-31-1980", "2024_12_01", "31011980", "", "A" * 65, "P1/../../etc", "P1;DROP", "émile",
]


@pytest.mark.parametrize("value", ANONYMISED)
def test_anonymised_ids_pass(value: str) -> None:
    assert PATIENT_ID.validate_python(value) == value


@pytest.mark.parametrize("value", IDENTIFYING)
def test_names_dates_and_odd_values_are_refused_without_echo(value: str) -> None:
    with pytest.raises(ValidationError) as refused:
        PATIENT_ID.validate_python(value)
    messages = " ".join(e["msg"] for e in refused.value.errors(include_input=False))
    assert value.strip() == "" or value not in messages.replace("e.g. P123456", "")


def test_dates_are_real_calendar_dates() -> None:
    assert looks_like_date("20240229") and not looks_like_date("20230229") and not looks_like_date("P20240101")


@pytest.mark.parametrize("fmt", DATE_FORMATS)
def test_every_date_spelling_is_recognised(fmt: str) -> None:
    """The quick character check in front of the formats lets every date of every format through to be parsed."""
    for day in (date(1999, 1, 2), date(2024, 12, 31), date(1980, 10, 5)):
        assert looks_like_date(day.strftime(fmt)), day.strftime(fmt)
    assert looks_like_date("1.2.99")  # strptime's one-digit day and month


def test_the_configured_pattern_cannot_loosen_the_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import get_settings

    monkeypatch.setattr(get_settings(), "patient_id_pattern", r"^.{1,64}$")
    assert check_patient_id("P1?x") == "P1?x"
    for identifying in ("Any Thing", "Doe^Jane", "1980-01-31"):
        with pytest.raises(ValueError):
            check_patient_id(identifying)
    monkeypatch.setattr(get_settings(), "patient_id_pattern", r"^(?!TEST)P\d{6}$")
    assert check_patient_id("P123456") == "P123456"
    with pytest.raises(ValueError, match="configured"):
        check_patient_id("P12")


async def echo_form(request: Request) -> JSONResponse:
    form = await request.form()
    items = [(k, v if isinstance(v, str) else f"file:{v.filename}") for k, v in form.multi_items()]
    return JSONResponse({k: [v for key, v in items if key == k] for k in form})


async def echo_body(request: Request) -> JSONResponse:
    return JSONResponse({"size": len(await request.body())})


def guarded() -> TestClient:
    app = Starlette(routes=[Route("/upload", echo_form, methods=["POST"]), Route("/raw", echo_body, methods=["POST"]),
                            Route("/plain", echo_body, methods=["POST"])])
    return TestClient(UploadGuardMiddleware(app, {"/upload": frozenset({"image"}), "/raw": frozenset({"image"})}))


def assert_not_a_file(response, field: str = "image") -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "INVALID_REQUEST" and error["details"] == {"field": field}


def test_a_real_upload_passes_and_a_string_file_field_is_refused() -> None:
    client = guarded()
    ok = client.post("/upload", files={"image": ("ct.png", b"\x89PNG")}, data={"patient_id": "P1"})
    assert ok.json() == {"image": ["file:ct.png"], "patient_id": ["P1"]}
    assert_not_a_file(client.post("/upload", files={"x": ("a", b"1")}, data={"image": "http://169.254.169.254/latest"}))
    assert_not_a_file(client.post("/upload", data={"image": "https://example.org/ct.dcm"}))


@pytest.mark.parametrize("value", ["Smith^John", "1980-01-31", '"John Smith"'])
def test_a_named_or_dated_patient_id_is_refused_before_the_form_is_parsed(value: str) -> None:
    client = guarded()
    for response in (client.post("/upload", files={"image": ("ct.png", b"1")}, data={"patient_id": value}),
                     client.post("/upload", data={"patient_id": value})):
        assert response.status_code == 400 and response.json()["error"]["details"] == {"field": "patient_id"}
        assert value.strip('"') not in response.text
    assert client.post("/upload", files={"image": ("ct.png", b"1")}, data={"patient_id": '"P1"'}).status_code == 200


def test_a_bare_url_body_is_refused_and_json_is_replayed() -> None:
    client = guarded()
    assert_not_a_file(client.post("/raw", content=b'"http://10.0.0.1/ct.dcm"', headers={"content-type": "application/json"}))
    assert client.post("/raw", json={"model_id": "ct"}).json() == {"size": len(b'{"model_id":"ct"}')}
    assert client.post("/plain", content=b"http://x/y").json() == {"size": 10}


def test_large_multipart_upload_streams_through() -> None:
    client = guarded()
    ok = client.post("/upload", files=[("image", ("a.nii", b"\0" * 300_000)), ("image", ("b.nii", b"1"))])
    assert ok.status_code == 200 and ok.json()["image"] == ["file:a.nii", "file:b.nii"]


def test_field_checks_see_the_last_value_as_bentoml_decodes_it_before_the_route_sees_the_body() -> None:
    """A field check runs once the whole body has arrived, wherever the field stands (here after a large file), on
    the value BentoML reads (the last one, JSON-decoded); a refusal means the route never ran. Values over the size
    cap are not checked."""
    from api.uploads import MAX_CHECKED_BYTES
    from core.errors import InvalidRequest

    seen, routed = [], []

    async def refuse_dwi(value):
        seen.append(value)
        return InvalidRequest("no DWI", {"field": "sequence_type"}) if "DWI" in value else None

    async def route(request: Request) -> JSONResponse:
        routed.append(len(await request.body()))
        return JSONResponse({})

    app = Starlette(routes=[Route("/mri", route, methods=["POST"])])
    client = TestClient(UploadGuardMiddleware(app, {"/mri": frozenset({"image"})},
                                              field_checks={"/mri": {"sequence_type": refuse_dwi}}))

    def post(*values: str):
        body = [("image", ("a.nii", b"\0" * 300_000))] + [("sequence_type", (None, v.encode())) for v in values]
        return client.post("/mri", files=body)

    refused = post("T1", '["T2", "DWI"]')
    assert refused.status_code == 400 and refused.json()["error"]["message"] == "no DWI" and routed == []
    assert seen == [["T2", "DWI"]]
    assert post("DWI", "T1").status_code == 200 and seen[-1] == "T1" and len(routed) == 1
    assert post("DWI" + " " * MAX_CHECKED_BYTES).status_code == 200 and len(seen) == 2
    assert client.post("/mri", files={"image": ("a.nii", b"1")}).status_code == 200 and len(seen) == 2


def test_file_fields_come_from_bentoml_api_methods() -> None:
    class Spec:
        def __init__(self, fields: list[str]) -> None:
            self.multipart_fields = fields

    class Method:
        def __init__(self, route: str, fields: list[str], is_task: bool = False) -> None:
            self.route, self.input_spec, self.is_task = route, Spec(fields), is_task

    apis = {"a": Method("/ct", ["image"]), "b": Method("/mri", ["image"], is_task=True), "c": Method("/json", [])}
    assert file_fields_by_path(apis) == {"/ct": {"image"}, "/mri": {"image"}, "/mri/submit": {"image"}, "/json": set()}


async def model_response(request: Request) -> JSONResponse:
    if request.path_params.get("fail"):
        return JSONResponse({"success": False, "error": {"code": "INVALID_REQUEST", "message": "m"}}, status_code=400)
    return JSONResponse({"success": True, "request_id": "req_abc", "model_id": "ct_classification",
                         "model_version": "neuronova-ct:v1", "result": {}})


def test_one_json_line_per_request_with_whitelisted_fields() -> None:
    app = Starlette(routes=[Route("/predict/ct_classification", model_response, methods=["POST"]),
                            Route("/predict/ct_classification/{fail}", model_response, methods=["POST"])])
    labels = EndpointLabels(["/predict/ct_classification", "/predict/ct_classification/{fail}"])
    client = TestClient(AccessLogMiddleware(app, route_label=labels))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLineFormatter())
    logging.getLogger(ACCESS_LOGGER).addHandler(handler)
    try:
        client.post("/predict/ct_classification", data={"patient_id": "P987654"}, headers={"Authorization": "Bearer tok.en.x"})
        client.post("/predict/ct_classification/Doe^Jane", headers={"X-Request-ID": "django-42"})
        client.get("/livez")
    finally:
        logging.getLogger(ACCESS_LOGGER).removeHandler(handler)
    text = stream.getvalue()
    ok, failed = (json.loads(line) for line in text.splitlines())
    assert ok["request_id"] == "req_abc" and ok["model"] == "ct_classification" and ok["version"] == "neuronova-ct:v1"
    assert ok["status"] == 200 and ok["outcome"] == "ok" and ok["route"] == "/predict/ct_classification"
    assert ok["latency_ms"] >= 0 and ok["error_code"] is None and ok["method"] == "POST"
    assert failed["request_id"] == "django-42" and failed["error_code"] == "INVALID_REQUEST"
    assert failed["outcome"] == "client_error" and failed["version"] is None
    assert failed["route"] == "/predict/ct_classification/{fail}"  # the route as written, not the caller's path
    assert "P987654" not in text and "tok.en.x" not in text and "Jane" not in text


def test_route_model_map() -> None:
    assert route_model("/predict/mri_segmentation/submit") == "mri_segmentation"
    assert route_model("/xai/explain") == "ct_classification" and route_model("/health") is None


class TaskInput(BaseModel):
    image: Annotated[list[Path], Field(min_length=1)]
    patient_id: str
    xai: bool = False
    note: str | None = None


def validating(routed: list[int]) -> TestClient:
    async def route(request: Request) -> JSONResponse:
        routed.append(len(await request.body()))
        return JSONResponse({"task_id": "t"})

    app = Starlette(routes=[Route("/mri/submit", route, methods=["POST"])])
    return TestClient(UploadGuardMiddleware(app, {"/mri/submit": frozenset({"image"})},
                                            validated={"/mri/submit": TaskInput}))


def test_a_task_form_is_validated_as_bentoml_will_before_the_route_stores_it() -> None:
    """BentoML answers a task submission before validating it: the guard refuses what its input model will refuse
    (no file, a JSON list for a bool, ...) with the pydantic errors, without values, and the route never runs."""
    routed: list[int] = []
    client = validating(routed)
    no_file = client.post("/mri/submit", files={"x": ("a", b"1")}, data={"patient_id": "P1"})
    assert no_file.status_code == 400 and no_file.json()["error"]["details"]["errors"][0]["loc"] == ["image"]
    listed = client.post("/mri/submit", files={"image": ("a.nii", b"1")}, data={"patient_id": "P1", "xai": "[1]"})
    assert listed.status_code == 400 and listed.json()["error"]["details"]["errors"][0]["loc"] == ["xai"]
    assert "[1]" not in listed.text and routed == []
    two = [("image", ("a.nii", b"\0" * 300_000)), ("image", ("b.nii", b"1")), ("patient_id", (None, b"P1")),
           ("xai", (None, b"[1]")), ("xai", (None, b"true"))]  # the last value is BentoML's
    assert client.post("/mri/submit", files=two).status_code == 200 and len(routed) == 1
    assert client.post("/mri/submit", files=two[:3] + [two[4], two[3]]).status_code == 400
    oversized = [("image", ("a.nii", b"1")), ("patient_id", (None, b"P1")), ("note", (None, b"x" * (MAX_FORM_BYTES + 1))),
                 ("xai", (None, b"[1]"))]
    assert client.post("/mri/submit", files=oversized).status_code == 200  # left to BentoML's own validation
    assert len(routed) == 2


def test_task_inputs_come_from_bentoml_task_methods() -> None:
    class Method:
        def __init__(self, route: str, is_task: bool) -> None:
            self.route, self.input_spec, self.is_task = route, TaskInput, is_task

    apis = {"a": Method("/ct", False), "b": Method("/mri", True)}
    assert task_inputs_by_path(apis) == {"/mri": TaskInput, "/mri/submit": TaskInput}


@pytest.mark.parametrize(("content_type", "body"), [
    ("multipart/form-data", b""),  # no boundary
    ("application/x-www-form-urlencoded", b"patient_id=P1"),  # no file can come this way
    ("text/plain", b""),
    ("application/json", b'["P1"]'),
    ("application/json", b'{"image": ["a"], "patient_id": "P1", "xai": "maybe"}'),
])
def test_a_task_body_that_is_no_valid_form_or_json_is_refused(content_type, body) -> None:
    routed: list[int] = []
    response = validating(routed).post("/mri/submit", content=body, headers={"content-type": content_type})
    assert response.status_code == 400 and response.json()["error"]["code"] == "INVALID_REQUEST" and routed == []


def test_a_valid_json_task_body_reaches_the_route() -> None:
    """In JSON a file field's string is the file's content (BentoML writes it to a file): valid, not fetched."""
    routed: list[int] = []
    client = validating(routed)
    assert client.post("/mri/submit", json={"image": ["abc"], "patient_id": "P1", "xai": True}).status_code == 200
    assert len(routed) == 1


def test_a_multipart_body_that_cannot_be_parsed_is_refused_before_the_route() -> None:
    """A part without headers (what schemathesis sent in negative mode): Starlette's 400 for it is raised inside
    BentoML's route, which answered 500; the guard refuses it first, on every API route."""
    routed: list[int] = []

    async def route(request: Request) -> JSONResponse:
        routed.append(len(await request.body()))
        return JSONResponse({})

    app = Starlette(routes=[Route("/upload", route, methods=["POST"]), Route("/json", route, methods=["POST"])])
    client = TestClient(UploadGuardMiddleware(app, {"/upload": frozenset({"image"}), "/json": frozenset()}))
    body = b"--e6b8\r\n[[[4.7e+16, true]], {}, []]--e6b8--\r\n"
    for path in ("/upload", "/json"):  # a JSON route parses a multipart body too
        response = client.post(path, content=body, headers={"content-type": "multipart/form-data; boundary=e6b8"})
        assert response.status_code == 400 and response.json()["error"]["details"] == {"reason": "malformed_multipart"}
    assert routed == []
    assert client.post("/json", json={"a": 1}).status_code == 200 and len(routed) == 1  # JSON passes untouched
