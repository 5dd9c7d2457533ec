"""Model lifecycle over HTTP: hot switch under load with no failed request, rollback, /xai/explain, /feedback."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select

from state.feedback import FeedbackStore
from core import store
from core.cards.classification import ClassificationCard
from state.feedback_db import feedback_records

CT_SMALL = Path(get_testdata_file("CT_small.dcm")).read_bytes()
CLIENTS = 8
DEADLINE_S = 120  # a liveness bound on waiting, not a timing claim


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def classify(http, **form):
    return http.post("/predict/ct_classification", files={"image": ("ct.dcm", CT_SMALL)},
                     data={"patient_id": "P000001", **form})


@pytest.fixture()
def second_ct_version(http, admin_headers):
    """Another stored version of the served CT model (same weights, a new card name); the served one is served again
    afterwards whatever the test did."""
    served = http.get("/health").json()["models"]["ct_classification"]["version"]
    model = store.get_model(served)
    card = store.read_card(model, ClassificationCard).model_copy(update={"name": "CT demo, second version"})
    files = {name: Path(model.path_of(name)) for name in (card.model_file, card.torch.weights_file)}
    tag = store.save_model("neuronova-ct", card, files)
    yield served, tag
    if http.get("/health").json()["models"]["ct_classification"]["version"] != served:
        http.post("/update_model", json={"model_id": "ct_classification", "version": served}, headers=admin_headers)
    store.delete_model(tag)


def test_switch_under_load_then_rollback(http, admin_headers, second_ct_version):
    """Clients classify without pause from before the switch until the new version has answered many times: requests
    are in flight as the switch begins and as it ends, both versions answer, none fails, and none sent after the
    switch was answered gets the old version."""
    old, new = second_ct_version
    answers: list[tuple[float, float, int, str | None]] = []  # (sent, answered, status, model_version)
    stop = threading.Event()

    def client_loop() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            response = classify(http)
            version = response.json().get("model_version") if response.status_code == 200 else None
            answers.append((sent, time.monotonic(), response.status_code, version))

    def answered_by(version: str) -> int:
        return sum(answer[3] == version for answer in list(answers))

    with ThreadPoolExecutor(CLIENTS) as pool:
        loops = [pool.submit(client_loop) for _ in range(CLIENTS)]
        try:
            wait_until(lambda: answered_by(old) >= 2 * CLIENTS)
            switch_sent = time.monotonic()
            switched = http.post("/update_model", json={"model_id": "ct_classification", "version": new},
                                 headers=admin_headers)
            switch_answered = time.monotonic()
            wait_until(lambda: answered_by(new) >= 2 * CLIENTS)
        finally:
            stop.set()
        for loop in loops:
            loop.result()
    assert switched.status_code == 200, switched.text
    body = switched.json()
    assert body["success"] is True and body["old_version"] == old and body["new_version"] == new
    assert [(r["version"], r["switched"], r["error"]) for r in body["replicas"]] == [(new, True, None)]  # this server
    assert [status for _, _, status, _ in answers] == [200] * len(answers)
    assert {version for *_, version in answers} == {old, new}
    assert any(sent < switch_sent < answered for sent, answered, _, _ in answers), "none in flight as it began"
    assert any(sent < switch_answered < answered for sent, answered, _, _ in answers), "none in flight as it ended"
    assert all(version == new for sent, _, _, version in answers if sent > switch_answered)
    assert classify(http).json()["model_version"] == new
    rolled = http.post("/update_model", json={"model_id": "ct_classification", "rollback": True}, headers=admin_headers)
    assert rolled.json()["new_version"] == old
    assert classify(http).json()["model_version"] == old


def test_a_version_that_cannot_load_is_refused_and_reported(http, admin_headers, second_ct_version):
    """A stored version whose card is valid but whose model file is not a model: the switch is reported failed (the
    server named, with the load error), the registry goes back and the old version keeps serving, healthy."""
    served, _ = second_ct_version
    model = store.get_model(served)
    card = store.read_card(model, ClassificationCard).model_copy(update={"name": "CT demo, unloadable"})
    broken = store.save_model("neuronova-ct", card, {card.model_file: b"not an ONNX model",
                                                     card.torch.weights_file: Path(model.path_of(card.torch.weights_file))})
    try:
        answer = http.post("/update_model", json={"model_id": "ct_classification", "version": broken},
                           headers=admin_headers)
    finally:
        store.delete_model(broken)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["success"] is False and body["new_version"] == served and broken in body["message"]
    [replica] = body["replicas"]
    assert replica["version"] == served and replica["switched"] is False and replica["error"]
    wait_until(lambda: http.get("/health").json()["status"] == "healthy")  # the runner follows the registry back
    assert http.get("/health").json()["models"]["ct_classification"]["version"] == served
    assert classify(http).json()["model_version"] == served


def test_update_model_refusals(http, admin_headers):
    refused = http.post("/update_model", json={"model_id": "ct_classification", "version": "nope"}, headers=admin_headers)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "INVALID_REQUEST"
    assert http.post("/update_model", json={"model_id": "ct_classification", "version": "x"}).status_code == 403
    wrong_task = store.list_versions("neuronova-biomarker")[0].tag
    response = http.post("/update_model", json={"model_id": "ct_classification", "version": str(wrong_task)},
                         headers=admin_headers)
    assert response.status_code == 400 and "not a ct_classification model" in response.json()["error"]["message"]


def test_explain_later_and_feedback(http):
    first = classify(http, request_id="req-later-1").json()
    explained = http.post("/xai/explain", json={"request_id": "req-later-1",
                                                "options": {"grad_cam": {"colormap": "viridis"}}})
    assert explained.status_code == 200, explained.text
    gradcam = explained.json()["xai"]["grad_cam"]
    assert gradcam["colormap"] == "viridis" and gradcam["target_class"] == first["result"]["predicted_class"]
    missing = http.post("/xai/explain", json={"request_id": "never-made"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "NOT_FOUND"
    receipt = http.post("/feedback", json={"request_id": "req-later-1", "verdict": "correct",
                                           "corrected_label": "No Tumor", "reviewer_id": "dr_1"})
    assert receipt.status_code == 200, receipt.text
    assert receipt.json()["model_version"] == first["model_version"]
    assert receipt.json()["input_sha256"] == first["metadata"]["input"]["sha256"]
    bad = http.post("/feedback", json={"request_id": "req-later-1", "verdict": "correct", "reviewer_id": "dr_1"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "INVALID_REQUEST"


def test_feedback_lands_in_the_served_instances_postgresql(http, postgres_server, served_database_url, tmp_path):
    """The served workers build their store from NEURONOVA_FEEDBACK__DATABASE_URL (FeedbackStore.from_settings)."""
    assert served_database_url and served_database_url.startswith(postgres_server.url(""))
    predicted = classify(http, request_id="req-served-pg").json()
    receipt = http.post("/feedback", json={"request_id": "req-served-pg", "verdict": "accept", "reviewer_id": "dr_pg"})
    assert receipt.status_code == 200, receipt.text
    with FeedbackStore(tmp_path / "unused", served_database_url).engine.connect() as connection:
        [row] = connection.execute(select(feedback_records).where(feedback_records.c.request_id == "req-served-pg"))
    assert (row.id, row.verdict, row.model_version) == (receipt.json()["feedback_id"], "accept", predicted["model_version"])
    assert row.input_sha256 == predicted["metadata"]["input"]["sha256"] and not (tmp_path / "unused").exists()
