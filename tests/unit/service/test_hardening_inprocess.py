"""Hardening of the real app in-process: anonymised patient ids on every route that takes one, file fields that
are never fetched from a URL, and one JSON access line per request without tokens or patient ids."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import socket
import sqlite3
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from api.access_log import ACCESS_LOGGER, JsonLineFormatter

CT = "/predict/ct_classification"
MRI_SUBMIT = "/predict/mri_segmentation/submit"
BIOMARKER = "/predict/biomarker_prediction"
IDENTIFYING = ("Doe^Jane", "1961-07-04", "Jane Doe")


@pytest.fixture(scope="module")
def client(inprocess_client):
    return inprocess_client


def png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_invalid(response, field: str | None = None) -> dict:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["success"] is False and body["error"]["code"] == "INVALID_REQUEST"
    if field is not None:
        assert body["error"]["details"] == {"field": field}
    return body


@pytest.mark.parametrize("patient_id", IDENTIFYING)
def test_identifying_patient_ids_are_refused_on_every_route(client, patient_id: str) -> None:
    responses = [
        client.post(CT, files={"image": ("ct.png", png())}, data={"patient_id": patient_id}),
        client.post(MRI_SUBMIT, files=[("image", ("t1.nii", b"x"))], data={"patient_id": patient_id}),
        client.post(BIOMARKER, json={"patient_id": patient_id, "biomarkers": {"age": 50}}),
    ]
    for response in responses:
        assert_invalid(response)
        assert patient_id not in response.text
    assert "task_id" not in responses[1].json()


@pytest.mark.parametrize(("route", "form", "files", "field"), [
    (MRI_SUBMIT, {"patient_id": "P000001"}, [], "image"),
    ("/predict/mri_segmentation", {"patient_id": "P000001"}, [], "image"),
    (MRI_SUBMIT, {"patient_id": "P000001", "xai": "[true]"}, [("image", ("t1.nii", b"x"))], "xai"),
    (MRI_SUBMIT, {"patient_id": "P000001", "post_processing": '{"min_area_pixels": "many"}'},
     [("image", ("t1.nii", b"x"))], "post_processing"),
])
def test_an_mri_submission_its_input_model_refuses_gets_no_task(client, route, form, files, field) -> None:
    """BentoML answers a task submission before it validates it (a task id, then a failed task); found by
    schemathesis in negative mode: such a submission is a 400 naming the field, and no task is created."""
    from api.tasks import bentoml_result_store_path

    def stored() -> int:  # BentoML's task store keeps every submission it accepted
        with sqlite3.connect(bentoml_result_store_path()) as connection:
            return connection.execute("SELECT count(*) FROM result").fetchone()[0]

    before = stored()
    body = assert_invalid(client.post(route, files=files or {"x": ("x", b"")}, data=form))
    assert body["error"]["details"]["errors"][0]["loc"][0] == field and "task_id" not in body
    assert stored() == before


@pytest.mark.parametrize(("form", "field"), [
    ({"xai": "0"}, "xai"), ({"uncertainty": "1"}, "uncertainty"),
    ({"post_processing": '{"remove_small_objects": 0}'}, "post_processing"),
    ({"post_processing": '{"min_area_pixels": "5"}'}, "post_processing"),
    ({"post_processing": '{"min_area_pixels": 5.0}'}, "post_processing"),
])
def test_booleans_and_integers_are_taken_as_declared_only(client, form, field) -> None:
    """Found by schemathesis in negative mode: pydantic's lax mode took 0 and 1 for booleans, "5" and 5.0 for
    integers, which the document declares as booleans and integers: refused now (JSON `true`/`false` as ever)."""
    body = assert_invalid(client.post(MRI_SUBMIT, files=[("image", ("t1.nii", b"x"))],
                                      data={"patient_id": "P000001", **form}))
    assert body["error"]["details"]["errors"][0]["loc"][0] == field
    biomarker = client.post(BIOMARKER, json={"patient_id": "P000001", "biomarkers": {"age": 50}, "xai": 1,
                                             "xai_options": {"shap": {"plots": "yes"}}})
    assert {tuple(e["loc"][:1]) for e in assert_invalid(biomarker)["error"]["details"]["errors"]} >= {("xai",)}


@pytest.mark.parametrize("route", [CT, MRI_SUBMIT, "/update_model", "/feedback", BIOMARKER, "/xai/explain"])
def test_a_multipart_body_that_cannot_be_parsed_is_a_400_not_a_500(client, route) -> None:
    """Found by schemathesis in negative mode: a part without headers made Starlette raise its 400 inside BentoML's
    route, which answered 500, on every API route (JSON routes parse a multipart body too)."""
    import time

    import jwt

    from tests.conftest import IN_PROCESS_SECRET

    admin = jwt.encode({"sub": "tests", "role": "admin", "exp": int(time.time()) + 600}, IN_PROCESS_SECRET)
    body = b"--e6b8\r\n[[[4.7e+16, true]], {}, []]--e6b8--\r\n"
    response = client.post(route, content=body, headers={"content-type": "multipart/form-data; boundary=e6b8",
                                                         "Authorization": f"Bearer {admin}"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["details"] == {"reason": "malformed_multipart"}


@contextlib.contextmanager
def listener() -> Iterator[tuple[str, list[object]]]:
    """A loopback TCP listener that records every connection made to it."""
    accepted: list[object] = []
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                connection, _ = server.accept()
                accepted.append(connection)
                connection.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/ct.dcm", accepted
    finally:
        stop.set()
        thread.join()
        server.close()


def test_file_fields_given_as_urls_are_refused_and_never_fetched(client) -> None:
    with listener() as (url, accepted):
        assert_invalid(client.post(CT, files={"x": ("a.txt", b"1")}, data={"image": url, "patient_id": "P1"}), "image")
        assert_invalid(client.post(CT, data={"image": url, "patient_id": "P1"}), "image")
        assert_invalid(client.post(CT, content=json.dumps(url), headers={"content-type": "application/json"}), "image")
        assert_invalid(client.post(MRI_SUBMIT, files={"x": ("a.txt", b"1")}, data={"image": url, "patient_id": "P1"}),
                       "image")
    assert accepted == []
    assert client.get("/health").status_code == 200


def test_one_json_access_line_per_request_without_token_or_patient_id(client) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLineFormatter())
    logging.getLogger(ACCESS_LOGGER).addHandler(handler)
    try:
        ok = client.post(CT, files={"image": ("ct.png", png())}, data={"patient_id": "P424242", "request_id": "req-log-1"})
        refused = client.post(CT, files={"image": ("ct.png", png())}, data={"patient_id": "Doe^Jane"})
    finally:
        logging.getLogger(ACCESS_LOGGER).removeHandler(handler)
    assert ok.status_code == 200 and refused.status_code == 400
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    served, failed = lines
    assert served["request_id"] == "req-log-1" and served["model"] == "ct_classification"
    assert served["version"] == ok.json()["model_version"] and served["status"] == 200 and served["outcome"] == "ok"
    assert served["route"] == CT and served["latency_ms"] > 0
    assert failed["status"] == 400 and failed["error_code"] == "INVALID_REQUEST" and failed["outcome"] == "client_error"
    token = client.headers["authorization"].split()[1]
    text = stream.getvalue()
    assert token not in text and "P424242" not in text and "Doe^Jane" not in text and "Doe" not in text
