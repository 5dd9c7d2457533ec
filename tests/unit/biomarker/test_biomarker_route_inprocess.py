"""The biomarker route called on an in-process NeuroNova instance (runners in-process, no ASGI app: a second app in
the same test session would register BentoML's Prometheus metrics twice). HTTP-level validation is in tests/http."""

from __future__ import annotations

import asyncio
import copy
import json

import pytest
from biomarker_inputs import SPEC_EXAMPLE

from core.schemas import BiomarkerResponse, BiomarkerXaiOptions, ShapOptions
from runners.biomarker import LoadedTabular

@pytest.fixture(scope="module")
def service():
    from training_export.demo import ensure_demo_models

    ensure_demo_models(["neuronova-biomarker"])
    from service import NeuroNova

    return NeuroNova()


def predict(service, biomarkers=SPEC_EXAMPLE, xai: bool = False, plots: bool = False, request_id: str | None = None):
    """The route with every argument given (called directly, its pydantic defaults are not applied)."""
    return asyncio.run(service.predict_biomarker_prediction(
        biomarkers=biomarkers, patient_id="P123456", request_id=request_id, xai=xai, xai_methods=["shap"],
        xai_options=BiomarkerXaiOptions(shap=ShapOptions(plots=plots)),
    ))


def test_spec_example_without_xai_does_no_shap_work(service, monkeypatch):
    def no_shap(self, rows):
        raise AssertionError("SHAP computed for xai=false")

    monkeypatch.setattr(LoadedTabular, "explain", no_shap)
    response = predict(service, request_id="req-1")
    assert isinstance(response, BiomarkerResponse), getattr(response, "body", response)
    assert response.request_id == "req-1" and response.model_id == "biomarker_prediction"
    assert response.xai is None and response.warnings == [] and response.intended_use == "demo, not for clinical use"
    result = response.result
    assert result.tumor_type.predicted_class == "Prostate"
    assert result.metastasis.detected == (result.metastasis.organ.predicted_class != "None")
    assert set(result.metastasis.stage.probabilities) == {"T1", "T2", "T3", "T4", "None"}
    assert set(result.heads) == {"tumor_type", "metastasis_organ", "stage"}


def test_spec_example_with_shap_is_additive_and_plots_on_request(service):
    shap = predict(service, xai=True).xai["shap"]
    assert shap.head == "tumor_type" and shap.target_class == "Prostate"
    assert (shap.feature_importance[0].feature, shap.feature_importance[0].value) == ("tumor_markers.PSA", 28.0)
    for head, explanation in shap.heads.items():
        total = shap.base_values[head] + sum(item.importance for item in explanation.feature_importance)
        assert total == pytest.approx(explanation.margin, abs=1e-9)
    assert shap.shap_plot_base64 is None and shap.waterfall_plot_base64 is None
    plotted = predict(service, xai=True, plots=True).xai["shap"]
    assert plotted.shap_plot_base64.startswith("data:image/png;base64,")
    assert plotted.waterfall_plot_base64.startswith("data:image/png;base64,")


def test_missing_optional_values_are_warned_about(service):
    biomarkers = copy.deepcopy(SPEC_EXAMPLE)
    del biomarkers["blood_test"]["platelet"]
    response = predict(service, biomarkers, xai=True)
    assert response.warnings == ["blood_test.platelet was not given: the model treated it as missing"]
    values = {item.feature: item.value for item in response.xai["shap"].feature_importance}
    assert values["blood_test.platelet"] is None


def test_a_bad_record_is_a_400_listing_every_field(service):
    response = predict(service, {**SPEC_EXAMPLE, "age": "old", "smoker": True})
    assert response.status_code == 400
    error = json.loads(response.body)["error"]
    assert error["code"] == "INVALID_REQUEST"
    assert {tuple(e["loc"]) for e in error["details"]["errors"]} == {("biomarkers", "age"), ("biomarkers", "smoker")}


def test_model_info_and_health_publish_the_schema(service):
    info = {m.model_id: m for m in asyncio.run(service.model_info()).models}["biomarker_prediction"]
    assert info.type == "tabular" and info.input_format == ["json"] and info.xai_supported == ["shap"]
    assert info.output_classes["metastasis_organ"] == ["Brain", "Lung", "Liver", "Bone", "None"]
    features = {f["name"]: f for f in info.card["features"]}
    cea = features["tumor_markers.CEA"]
    assert (cea["type"], cea["unit"], cea["optional"], cea["min"]) == ("number", "ng/mL", True, 0)
    assert features["imaging_features.tumor_shape"]["categories"][0] == "none"
    assert features["gender"]["codes"] == {"M": "male", "F": "female", "O": "other"}
    numbers = {name for name, f in features.items() if f["type"] == "number"}
    assert set(info.input_units) == numbers and info.input_units["blood_test.WBC"] == "/uL"
    health = json.loads(asyncio.run(service.health()).body)
    assert health["models"]["biomarker_prediction"]["loaded"] is True


def test_the_design_example_with_explicit_units_gets_the_same_answer(service):
    """SPEC_EXAMPLE is the design's request as written (gender "M", WBC 7500 and platelets 250000 per µL); the same
    values in other units of the same dimension are converted (pint) to exactly the same answer."""
    with_units = copy.deepcopy(SPEC_EXAMPLE)
    with_units["gender"] = "male"
    with_units["age"] = {"value": 67 * 12, "unit": "mo"}
    with_units["blood_test"].update(WBC={"value": 7.5, "unit": "10^9/L"}, platelet={"value": 250, "unit": "10*3/uL"},
                                    hemoglobin={"value": 141, "unit": "g/L"})
    with_units["imaging_features"]["tumor_size_mm"] = {"value": 4.2, "unit": "cm"}
    plain, converted = predict(service, xai=True), predict(service, with_units, xai=True)
    assert converted.result == plain.result
    assert [(i.feature, i.importance) for i in converted.xai["shap"].feature_importance] == \
        [(i.feature, i.importance) for i in plain.xai["shap"].feature_importance]


def test_a_wrong_unit_is_refused_naming_the_field_and_the_unit(service):
    wrong = copy.deepcopy(SPEC_EXAMPLE)
    wrong["blood_test"]["WBC"] = {"value": 7.5, "unit": "mg/dL"}
    response = predict(service, wrong)
    body = json.loads(response.body)
    assert response.status_code == 400 and body["error"]["code"] == "INVALID_REQUEST"
    assert "biomarkers.blood_test.WBC" in body["error"]["message"] and "'mg/dL'" in body["error"]["message"]
    assert body["error"]["details"]["errors"][0]["type"] == "wrong_unit"
