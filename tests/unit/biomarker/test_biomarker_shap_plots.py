"""SHAP response shaping: ranking by |SHAP| with the caller's values, additivity of each head, PNG plots on request."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from core.cards.tabular import HeadOutput
from xai.shap_plots import MAX_DISPLAY, explain_head, feature_importance, shap_explanation

FEATURES = [f"group.f{i}" for i in range(14)]
VALUES = {name: float(i) for i, name in enumerate(FEATURES)} | {"group.f3": None, "group.f4": "round", "group.f5": True}


def decode_png(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    image.load()
    assert image.format == "PNG"
    return image


def head(name: str = "tumor_type", seed: int = 0) -> HeadOutput:
    rng = np.random.default_rng(seed)
    return HeadOutput(name, ["a", "b", "c"], np.array([0.2, 0.5, 0.3]), rng.normal(0, 1, (3, len(FEATURES))),
                      np.array([0.1, -0.4, 0.2]))


def test_features_are_ranked_by_magnitude_with_their_values():
    shap_values = np.array([0.1, -3.0, 2.0, 0.0] + [0.0] * 10)
    ranked = feature_importance(shap_values, VALUES, FEATURES)
    assert [r.feature for r in ranked[:3]] == ["group.f1", "group.f2", "group.f0"]
    assert ranked[0].importance == -3.0 and ranked[0].value == 1.0
    assert [r.feature for r in ranked[3:6]] == ["group.f3", "group.f4", "group.f5"]  # ties keep card order
    assert [r.value for r in ranked[3:6]] == [None, "round", True]


def test_each_head_explains_its_predicted_class_additively():
    output = head()
    explanation, base = explain_head(output, VALUES, FEATURES)
    assert explanation.target_class == "b" and base == pytest.approx(-0.4)
    total = base + sum(item.importance for item in explanation.feature_importance)
    assert explanation.margin == pytest.approx(total, abs=1e-12)
    assert explanation.margin == pytest.approx(-0.4 + output.shap_values[1].sum(), abs=1e-12)


def test_the_first_head_fills_the_spec_fields_and_plots_are_optional():
    heads = {"tumor_type": head(), "stage": head("stage", seed=1)}
    plain = shap_explanation(heads, VALUES, FEATURES)
    assert plain.head == "tumor_type" and plain.target_class == "b" and plain.method == "tree_shap"
    assert plain.feature_importance == plain.heads["tumor_type"].feature_importance
    assert set(plain.base_values) == {"tumor_type", "stage"} and plain.base_values["stage"] == pytest.approx(-0.4)
    assert plain.shap_plot_base64 is None and plain.waterfall_plot_base64 is None

    plotted = shap_explanation(heads, VALUES, FEATURES, plots=True)
    for url in (plotted.shap_plot_base64, plotted.waterfall_plot_base64):
        image = decode_png(url)
        assert image.width >= 600 and image.height >= 300


def test_plots_of_few_features_have_no_remainder_bar():
    few = FEATURES[:MAX_DISPLAY - 2]
    output = HeadOutput("h", ["a", "b"], np.array([0.9, 0.1]), np.ones((2, len(few))), np.zeros(2))
    explanation = shap_explanation({"h": output}, VALUES, few, plots=True)
    assert decode_png(explanation.waterfall_plot_base64).height < decode_png(shap_explanation(
        {"tumor_type": head()}, VALUES, FEATURES, plots=True).waterfall_plot_base64).height


def test_a_head_without_shap_values_cannot_be_explained():
    with pytest.raises(ValueError, match="no SHAP values"):
        explain_head(HeadOutput("h", ["a", "b"], np.array([0.5, 0.5])), VALUES, FEATURES)
