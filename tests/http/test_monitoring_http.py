"""Monitoring against the real served process with a real Prometheus (the shipped scrape configuration and rules,
deploy/monitoring): a stream of CT slices from a miscalibrated scanner drives the drift alert, clinicians'
rejections the disagreement alert, and in-distribution traffic of the same length neither; every metric the
dashboard and the rules read is one the service exports."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.data import get_testdata_file

from core.ood import OOD_WARNING
from tests.prometheus import (
    Prometheus,
    dashboard_queries,
    metric_names,
    prometheus,
    recorded_names,
    rule_expressions,
)
from tests.unit.mri.mri_inputs import four_d_nifti
from training_export.synthetic_ct import write_ct_dicom
from training_export.synthetic_mri import synthetic_case
from training_export.train_ct import heldout_set

CT = "/predict/ct_classification"
STREAM = 60
"""Requests in each stream: more than a worker's drift window (50), so that the in-distribution stream replaces
whatever the window held before."""
PER_CLASS = STREAM // 4
SCANNER_OFFSET_HU = 150.0
"""The shifted scanner: its CT numbers read 150 HU high (a calibration fault; the model never saw one)."""
DRIFT_ALERT = 4.0
MOST_FLAGS_WITHOUT_ALARM = 6
"""With at most this many flags among any window of 20 or more in-distribution checks, the score stays below 4."""
VERDICTS = 20
DETECTED_WITHIN = 20
"""Shifted slices until the drift score passes the alert threshold, at most (measured: 10)."""


@pytest.fixture(scope="module")
def monitor(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    with prometheus(server_url, tmp_path_factory.mktemp("prometheus")) as server:
        yield server


def dicom_bytes(hu: np.ndarray, folder: Path) -> bytes:
    path = folder / f"{uuid.uuid4().hex}.dcm"
    write_ct_dicom(hu, path)
    return path.read_bytes()


def classify(http: httpx.Client, data: bytes) -> dict:
    response = http.post(CT, files={"image": ("slice.dcm", data)},
                         data={"patient_id": "P000077", "request_id": f"drift-{uuid.uuid4().hex}"})
    assert response.status_code == 200, response.text
    return response.json()


def give_verdicts(http: httpx.Client, answers: list[dict], verdict: str) -> None:
    for answer in answers:
        response = http.post("/feedback", json={"request_id": answer["request_id"], "verdict": verdict,
                                                "reviewer_id": "ignored-token-subject-wins"})
        assert response.status_code == 200, response.text


def drift_score(http: httpx.Client, version: str) -> float:
    """The drift gauge of the CT version on /metrics (the window of the worker that checked last)."""
    return next((sample.value for family in text_string_to_metric_families(http.get("/metrics").text)
                 for sample in family.samples if sample.name == "neuronova_input_drift_score"
                 and sample.labels["model_id"] == "ct_classification" and sample.labels["model_version"] == version), 0.0)


def ct_alerts(monitor: Prometheus, version: str) -> dict[str, str]:
    """The active alerts on the served CT version, by name."""
    return {name.split()[0]: state for name, state in monitor.alerts().items()
            if name.endswith(f" ct_classification {version}")}


def scraped(monitor: Prometheus, expr: str, at_least: float) -> bool:
    return any(float(series["value"][1]) >= at_least for series in monitor.query(expr))


def test_a_shifted_scanner_fires_the_drift_alert_and_rejections_the_disagreement_alert(
        server_url: str, auth_headers: dict[str, str], monitor: Prometheus, tmp_path: Path) -> None:
    in_distribution, _, _ = heldout_set(seed=11, n_per_class=PER_CLASS)
    shifted, _, _ = heldout_set(seed=12, n_per_class=PER_CLASS)
    # One keep-alive connection: every request reaches the same API worker, whose window the gauge then shows.
    with httpx.Client(base_url=server_url, headers=auth_headers, timeout=60) as http:
        first = classify(http, dicom_bytes(in_distribution[0], tmp_path))
        version = first["model_version"]
        selector = f'model_id="ct_classification", model_version="{version}"'
        give_verdicts(http, [first], "accept")
        give_verdicts(http, [classify(http, dicom_bytes(in_distribution[1], tmp_path))], "reject")
        # Prometheus must hold both verdict series before the streams: increase() counts from its first sample.
        monitor.wait(lambda: len(monitor.query(f"neuronova_feedback_verdicts_total{{{selector}}}")) >= 2,
                     "the verdict series scraped")

        answers = [classify(http, dicom_bytes(hu, tmp_path)) for hu in in_distribution[2:]]
        answers += [classify(http, dicom_bytes(hu, tmp_path)) for hu in heldout_set(seed=13, n_per_class=1)[0][:2]]
        assert len(answers) == STREAM
        flagged = sum(OOD_WARNING in answer["warnings"] for answer in answers)
        assert flagged <= MOST_FLAGS_WITHOUT_ALARM  # the stream is in distribution, as the card's calibration sees it
        give_verdicts(http, answers[:VERDICTS], "accept")
        assert drift_score(http, version) < DRIFT_ALERT
        monitor.wait(lambda: scraped(monitor, f"neuronova:clinician_verdicts:increase_1d{{{selector}}}", VERDICTS),
                     "the accepts scraped and the rules evaluated on them")
        seen = time.time()
        monitor.wait(lambda: monitor.evaluated_since(seen), "every rule group evaluated on that scrape")
        assert ct_alerts(monitor, version) == {}, "an alert on in-distribution traffic"

        detected_after = None
        shifted_answers = []
        for n, hu in enumerate(shifted[:DETECTED_WITHIN], start=1):
            shifted_answers.append(classify(http, dicom_bytes(hu + SCANNER_OFFSET_HU, tmp_path)))
            if drift_score(http, version) > DRIFT_ALERT:
                detected_after = n
                break
        assert detected_after is not None and detected_after <= DETECTED_WITHIN, f"drift after {detected_after} slices"
        print(f"drift score above {DRIFT_ALERT} after {detected_after} shifted slices "
              f"({sum(OOD_WARNING in a['warnings'] for a in shifted_answers)} flagged)")
        monitor.wait(lambda: ct_alerts(monitor, version).get("NeuroNovaInputDrift") in ("pending", "firing"),
                     "the drift alert")
        assert "NeuroNovaClinicianDisagreement" not in ct_alerts(monitor, version)

        give_verdicts(http, answers[VERDICTS:2 * VERDICTS], "reject")  # clinicians reject what the model answered
        monitor.wait(lambda: ct_alerts(monitor, version).get("NeuroNovaClinicianDisagreement") in ("pending", "firing"),
                     "the disagreement alert")


def test_every_metric_the_dashboard_and_the_rules_read_is_exported(http: httpx.Client, monitor: Prometheus,
                                                                   tmp_path: Path) -> None:
    """Traffic of every kind (CT with a verdict, biomarkers with a feature missing, MRI with uncertainty), then
    the names on /metrics against the names in every dashboard query and rule."""
    answer = classify(http, open(get_testdata_file("CT_small.dcm"), "rb").read())
    labels = answer["result"]["probabilities"]
    corrected = next(label for label in labels if label != answer["result"]["predicted_class"])
    response = http.post("/feedback", json={"request_id": answer["request_id"], "verdict": "correct",
                                            "corrected_label": corrected, "reviewer_id": "dr-x"})
    assert response.status_code == 200, response.text
    biomarkers = {"age": 60, "gender": "female", "tumor_markers": {"CEA": 2.0},  # the rest of them not given
                  "imaging_features": {"tumor_size_mm": 30.0, "tumor_shape": "round", "necrosis_present": False}}
    response = http.post("/predict/biomarker_prediction", json={"patient_id": "P000078", "biomarkers": biomarkers})
    assert response.status_code == 200, response.text
    case = synthetic_case(5)
    task = http.post("/predict/mri_segmentation/submit", files={"image": ("case.nii.gz", four_d_nifti(case))},
                     data={"patient_id": "P000079", "uncertainty": "true"}).json()["task_id"]
    monitor.wait(lambda: http.get(f"/task/{task}").json()["status"] not in ("pending", "processing"), "the MRI task")
    assert http.get(f"/task/{task}").json()["status"] == "completed"

    exported = {sample.name for family in text_string_to_metric_families(http.get("/metrics").text)
                for sample in family.samples}
    read = {name for query in dashboard_queries() + rule_expressions() for name in metric_names(query)}
    assert read - exported - recorded_names() == set()
    assert {"neuronova_mri_uncertainty_mean_bucket", "neuronova_missing_features_total",
            "neuronova_feedback_corrections_total", "neuronova_tasks"} <= exported
    monitor.wait(lambda: monitor.query('up{job="neuronova"}') and
                 all(series["value"][1] == "1" for series in monitor.query('up{job="neuronova"}')),
                 "Prometheus scraping the served instance")
    assert monitor.query("neuronova_predictions_total")  # the service's own metrics reach Prometheus
