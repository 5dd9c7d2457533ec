"""Model lifecycle over HTTP: hot switch under load with no failed request, rollback, /xai/explain, /feedback."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from core import store
from core.cards.classification import ClassificationCard

CT_SMALL = Path(get_testdata_file("CT_small.dcm")).read_bytes()


def classify(http, **form):
    return http.post("/predict/ct_classification", files={"image": ("ct.dcm", CT_SMALL)},
                     data={"patient_id": "P000001", **form})


@pytest.fixture()
def second_ct_version(http):
    """Another stored version of the served CT model (same weights, a new card name)."""
    served = http.get("/health").json()["models"]["ct_classification"]["version"]
    model = store.get_model(served)
    card = store.read_card(model, ClassificationCard).model_copy(update={"name": "CT demo, second version"})
    files = {name: Path(model.path_of(name)) for name in (card.model_file, card.torch.weights_file)}
    tag = store.save_model("neuronova-ct", card, files)
    yield served, tag
    store.delete_model(tag)


def test_switch_under_load_then_rollback(http, admin_headers, second_ct_version):
    old, new = second_ct_version
    with ThreadPoolExecutor(8) as pool:
        load = [pool.submit(classify, http) for _ in range(60)]
        switched = http.post("/update_model", json={"model_id": "ct_classification", "version": new}, headers=admin_headers)
        responses = [future.result() for future in load]
    assert switched.status_code == 200, switched.text
    body = switched.json()
    assert body["success"] is True and body["old_version"] == old and body["new_version"] == new
    assert [r.status_code for r in responses] == [200] * 60
    assert {r.json()["model_version"] for r in responses} <= {old, new}
    assert classify(http).json()["model_version"] == new
    rolled = http.post("/update_model", json={"model_id": "ct_classification", "rollback": True}, headers=admin_headers)
    assert rolled.json()["new_version"] == old
    assert classify(http).json()["model_version"] == old


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
