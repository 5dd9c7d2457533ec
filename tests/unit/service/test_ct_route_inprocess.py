"""The public service in-process (Starlette TestClient over NeuroNova's ASGI app, runners in the same process)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file



@pytest.fixture(scope="module")
def client(inprocess_client):
    return inprocess_client


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_ct_dicom_with_gradcam(client):
    data = open(get_testdata_file("CT_small.dcm"), "rb").read()
    response = client.post("/predict/ct_classification", files={"image": ("ct.dcm", data)},
                           data={"patient_id": "P1", "xai": "true", "xai_methods": '["grad_cam"]', "metadata": '{"kvp": 120}'})
    assert response.status_code == 200, response.text
    body = response.json()
    assert abs(sum(body["result"]["probabilities"].values()) - 1) < 1e-4
    assert body["xai"]["grad_cam"]["target_class"] == body["result"]["predicted_class"]
    assert body["metadata"]["request_metadata"] == {"kvp": 120}
    assert body["request_id"].startswith("req_")


def test_mr_input_is_flagged_as_other_modality(client):
    data = open(get_testdata_file("MR_small.dcm"), "rb").read()
    body = client.post("/predict/ct_classification", files={"image": ("mr.dcm", data)}, data={"patient_id": "P1"}).json()
    assert "input modality MR differs from the model's training modality CT" in body["warnings"]


def test_bad_inputs(client):
    response = client.post("/predict/ct_classification", files={"image": ("x.png", b"not a png")}, data={"patient_id": "P1"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "INVALID_IMAGE_FORMAT"
    response = client.post("/predict/ct_classification", files={"image": ("x.png", png(np.zeros((8, 8), np.uint8)))},
                           data={"patient_id": "P1", "xai": "true", "xai_methods": "lime"})
    assert response.status_code == 400 and "lime" in response.json()["error"]["message"]


def test_health_and_model_info(client):
    health = client.get("/health")
    assert health.json()["models"]["ct_classification"]["loaded"] is True
    classified = client.post("/predict/ct_classification", files={"image": ("x.png", png(np.eye(32, dtype=np.uint8) * 200))},
                             data={"patient_id": "P1"})
    assert classified.status_code == 200, classified.text
    deadline = time.monotonic() + 30  # /model_info reuses the runner's description for DESCRIBE_TTL_SECONDS

    def average() -> float | None:
        models = {m["model_id"]: m for m in client.get("/model_info").json()["models"]}
        return models["ct_classification"]["avg_inference_time_ms"]

    while (measured := average()) is None:
        assert time.monotonic() < deadline, "no inference time reported after an image was served"
        time.sleep(0.2)
    assert measured > 0
