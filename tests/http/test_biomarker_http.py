"""Biomarker prediction over HTTP against the real served process: the SPEC example, exact SHAP, schema errors,
the published schema, and concurrent requests batched in the runner without mixing rows."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import bentoml
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from training_export.synthetic_biomarker import generate_cohort

ROUTE = "/predict/biomarker_prediction"
SPEC_EXAMPLE = {
    "age": 67, "gender": "male",
    "tumor_markers": {"CEA": 2.1, "CA125": 12.0, "AFP": 3.5, "PSA": 28.0},
    "blood_test": {"WBC": 7200, "RBC": 4.6, "hemoglobin": 14.1, "platelet": 250000},
    "genetic_markers": {"EGFR_mutation": False, "TP53_mutation": True, "KRAS_mutation": False},
    "imaging_features": {"tumor_size_mm": 42.0, "tumor_shape": "irregular", "necrosis_present": True},
}


def predict(http, biomarkers=SPEC_EXAMPLE, **fields):
    return http.post(ROUTE, json={"patient_id": "P000001", "biomarkers": biomarkers, **fields})


def test_spec_example_returns_three_heads_and_additive_shap(http):
    response = predict(http, request_id="req-bio-1", xai=True, xai_methods=["shap"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["request_id"] == "req-bio-1" and body["model_version"].startswith("neuronova-biomarker:")
    assert body["intended_use"] == "demo, not for clinical use"
    result = body["result"]
    assert result["tumor_type"]["predicted_class"] == "Prostate"
    for probabilities in (result["tumor_type"]["probabilities"], result["metastasis"]["organ"]["probabilities"],
                          result["metastasis"]["stage"]["probabilities"]):
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    shap = body["xai"]["shap"]
    assert shap["feature_importance"][0]["feature"] == "tumor_markers.PSA"
    for head, explanation in shap["heads"].items():
        margin = shap["base_values"][head] + sum(item["importance"] for item in explanation["feature_importance"])
        assert margin == pytest.approx(explanation["margin"], abs=1e-9)
    assert shap["shap_plot_base64"] is None


def test_plots_decode_as_png(http):
    shap = predict(http, xai=True, xai_options={"shap": {"plots": True}}).json()["xai"]["shap"]
    for url in (shap["shap_plot_base64"], shap["waterfall_plot_base64"]):
        assert url.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        image.load()
        assert image.format == "PNG" and image.width > 300


def test_every_bad_field_is_listed_in_one_400(http):
    biomarkers = {**SPEC_EXAMPLE, "age": "67", "bmi": 31, "tumor_markers": {"CEA": float("1e9")}}
    response = predict(http, biomarkers)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "INVALID_REQUEST" and set(error) == {"code", "message", "details", "timestamp"}
    assert {(".".join(e["loc"]), e["type"]) for e in error["details"]["errors"]} == {
        ("biomarkers.age", "wrong_type"), ("biomarkers.bmi", "unknown_field"),
        ("biomarkers.tumor_markers.CEA", "out_of_range"),
    }
    assert predict(http, None).status_code == 400


def test_model_info_publishes_the_feature_schema(http):
    info = {m["model_id"]: m for m in http.get("/model_info").json()["models"]}["biomarker_prediction"]
    assert info["type"] == "tabular" and info["xai_supported"] == ["shap"]
    assert set(info["output_classes"]) == {"tumor_type", "metastasis_organ", "stage"}
    assert len(info["card"]["features"]) == 16 and info["metrics"]["tumor_type_accuracy"] > 0.8


def explain_batches(http) -> int:
    """How many batches the biomarker runner's `explain` has run so far: the rows-per-batch histogram its array route
    (runners/array_route.py) observes per dispatched batch, read from /metrics."""
    total = 0
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if (sample.labels.get("runner_name") == "BiomarkerModel" and sample.labels.get("method_name") == "explain"
                    and sample.name == "neuronova_runner_batch_rows_count"):
                total += int(sample.value)
    return total


def test_concurrent_requests_are_batched_without_mixing_rows(http):
    records = generate_cohort(48, seed=77).records
    sequential = [predict(http, r, xai=True).json() for r in records]
    batches_before = explain_batches(http)
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(lambda r: predict(http, r, xai=True).json(), records))
    batches_after = explain_batches(http)
    for alone, batched in zip(sequential, concurrent):
        assert (batched["result"], batched["xai"]) == (alone["result"], alone["xai"])
    assert batches_before >= len(records)  # the sequential phase was seen by the histogram: one batch per request
    # Fewer model calls than requests, so some batches carried several requests' rows (merged by the API workers,
    # pipelines/coalescing.py, or by the runner's adaptive batching: the histogram counts calls, not rows).
    assert batches_after - batches_before < len(records), batches_after - batches_before


def test_bentoml_client_calls_the_route(server_url, auth_headers):
    with bentoml.SyncHTTPClient(server_url, token=auth_headers["Authorization"].split()[1]) as client:
        body = client.predict_biomarker_prediction(patient_id="P000001", biomarkers=SPEC_EXAMPLE)
    assert body["result"]["tumor_type"]["predicted_class"] == "Prostate"
