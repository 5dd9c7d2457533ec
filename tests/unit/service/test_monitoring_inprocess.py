"""Per-version monitoring in-process: what an answer and a clinician's verdict add to the metrics and to /model_info."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from monitoring.live import replica_samples
from monitoring.metrics import OTHER, bounded, reference_accuracy


def value(name: str, **labels: str) -> float:
    """The sum of this process's samples of `name` whose labels include `labels` (0 when there is none)."""
    return sum(s.value for s in replica_samples() if s.name == name and labels.items() <= s.labels.items())


def ct_live(client) -> dict:
    return next(m for m in client.get("/model_info").json()["models"] if m["model_id"] == "ct_classification")


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_answer_and_a_verdict_reach_the_version_s_metrics_and_model_info(inprocess_client) -> None:
    client = inprocess_client
    before = ct_live(client)
    version = before["version"]
    versioned = {"model_id": "ct_classification", "model_version": version}
    dicom_before = value("neuronova_inputs_total", **versioned, format="dicom", modality="CT")
    data = open(get_testdata_file("CT_small.dcm"), "rb").read()
    answer = client.post("/predict/ct_classification", files={"image": ("ct.dcm", data)},
                         data={"patient_id": "P1", "request_id": "monitor-1"}).json()
    predicted = answer["result"]["predicted_class"]
    flagged = "input unlike the model's training data" in answer["warnings"]

    after = ct_live(client)["live"]
    assert after["predictions"]["class"][predicted] == before["live"]["predictions"].get("class", {}).get(predicted, 0) + 1
    assert after["ood_checks"] == before["live"]["ood_checks"] + 1
    assert after["ood_flagged"] == before["live"]["ood_flagged"] + flagged
    assert after["expected_ood_rate"] == pytest.approx(1 - before["card"]["ood"]["coverage"] / 100)
    assert after["reference_accuracy"] == before["metrics"]["accuracy"]
    assert value("neuronova_inputs_total", **versioned, format="dicom", modality="CT") == dicom_before + 1

    corrected = next(label for label in ("Glioma", "Meningioma") if label != predicted)
    receipt = client.post("/feedback", json={"request_id": "monitor-1", "verdict": "correct",
                                             "corrected_label": corrected, "reviewer_id": "dr-who"})
    assert receipt.status_code == 200, receipt.text
    live = ct_live(client)["live"]
    assert live["verdicts"]["correct"] == before["live"]["verdicts"].get("correct", 0) + 1
    assert live["agreement_rate"] == pytest.approx(live["verdicts"].get("accept", 0) / sum(live["verdicts"].values()))
    assert value("neuronova_feedback_corrections_total", **versioned, predicted_class=predicted,
                 corrected_class=corrected) >= 1


def test_a_png_has_no_modality_and_counts_as_unstated(inprocess_client) -> None:
    version = ct_live(inprocess_client)["version"]
    labels = {"model_id": "ct_classification", "model_version": version, "format": "png", "modality": "unstated"}
    before = value("neuronova_inputs_total", **labels)
    image = png((np.indices((64, 64)).sum(axis=0) % 255).astype(np.uint8))
    response = inprocess_client.post("/predict/ct_classification", files={"image": ("x.png", image)},
                                     data={"patient_id": "P1"})
    assert response.status_code == 200, response.text
    assert value("neuronova_inputs_total", **labels) == before + 1


def test_label_values_never_take_free_text() -> None:
    assert bounded("CT", ["CT", "MR"]) == "CT"
    assert bounded("Doe^John", ["CT", "MR"]) == OTHER
    assert bounded(None, ["CT"]) == OTHER


def test_the_reference_accuracy_is_the_card_s_own() -> None:
    assert reference_accuracy({"accuracy": 0.9, "macro_f1": 0.8}) == 0.9
    assert reference_accuracy({"tumor_type_accuracy": 0.87, "stage_accuracy": 0.96}, "tumor_type") == 0.87
    assert reference_accuracy({"dice_wt": 0.93}) is None
