"""TabularCard: the feature schema and heads are validated data, and the card reads a runner's output."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from core.cards import DEMO_INTENDED_USE, Provenance
from core.cards.tabular import BoolFeature, CategoryFeature, HeadSpec, NumberFeature, TabularCard
from training_export.synthetic_biomarker import SPEC_FEATURES


def card(**overrides) -> TabularCard:
    fields = {
        "name": "t", "intended_use": DEMO_INTENDED_USE, "provenance": Provenance(source="test", synthetic_data=True),
        "features": [NumberFeature(name="a.x", unit="1", min=0, max=1), BoolFeature(name="a.flag"),
                     CategoryFeature(name="kind", categories=["p", "q"])],
        "heads": [HeadSpec(name="h1", classes=["u", "v"], model_file="h1.ubj"),
                  HeadSpec(name="h2", classes=["u", "v", "w"], model_file="h2.ubj")],
    }
    return TabularCard(**{**fields, **overrides})


def test_defaults_and_accessors():
    c = card()
    assert c.task == "biomarker_prediction" and c.format == "xgboost"
    assert c.model_file == "h1.ubj"
    assert c.feature_names() == ["a.x", "a.flag", "kind"]
    assert c.output_classes() == {"h1": ["u", "v"], "h2": ["u", "v", "w"]}


def test_round_trips_through_json_without_nulls():
    """The store's metadata refuses None values: a dumped card holds none, and validates back to the same card."""
    c = card(features=list(SPEC_FEATURES))
    dumped = c.model_dump(mode="json")
    assert all(v is not None for f in dumped["features"] for v in f.values())
    assert TabularCard.model_validate(dumped) == c


@pytest.mark.parametrize("features, match", [
    ([NumberFeature(name="a", unit="1", min=0, max=1), BoolFeature(name="a")], "unique"),
    ([NumberFeature(name="a", unit="1", min=0, max=1), BoolFeature(name="a.b")], "inside another feature"),
])
def test_feature_set_must_be_consistent(features, match):
    with pytest.raises(ValidationError, match=match):
        card(features=features)


@pytest.mark.parametrize("spec, match", [
    ({"type": "number", "name": "x", "unit": "mm", "min": 2, "max": 1}, "min <= max"),
    ({"type": "number", "name": "x", "unit": "mm", "min": float("-inf"), "max": 1}, "finite"),
    ({"type": "number", "name": "x"}, "Field required"),
    ({"type": "number", "name": "x", "min": 0, "max": 1}, "unit"),  # every number declares its unit
    ({"type": "number", "name": "x", "unit": "bogons", "min": 0, "max": 1}, "not a known unit"),
    ({"type": "category", "name": "x", "categories": ["a", "b"], "codes": {"C": "c"}}, "stand for one of"),
    ({"type": "category", "name": "x", "categories": ["a", "b"], "codes": {"A": "b"}}, "distinct"),
    ({"type": "category", "name": "x", "categories": ["a"]}, "two or more"),
    ({"type": "category", "name": "x", "categories": ["a", "A"]}, "distinct"),
    ({"type": "bool", "name": "x", "min": 0}, "Extra inputs"),
    ({"type": "bool", "name": "x y"}, "pattern"),
    ({"type": "text", "name": "x"}, "does not match any of the expected tags"),
])
def test_feature_specs_are_checked(spec, match):
    with pytest.raises(ValidationError, match=match):
        card(features=[spec])


def test_heads_must_be_unique_and_within_the_contract():
    with pytest.raises(ValidationError, match="unique"):
        card(heads=[HeadSpec(name="h", classes=["a", "b"], model_file=f) for f in ("f", "g")])
    with pytest.raises(ValidationError, match="contract"):
        card(heads=[HeadSpec(name="stage", classes=["T1", "T5"], model_file="s.ubj")])
    with pytest.raises(ValidationError, match="not a head's file"):
        card(model_file="other.ubj")
    assert card(model_file="h2.ubj").model_file == "h2.ubj"


def test_read_heads_splits_probabilities_and_explanations():
    c = card()
    probabilities = np.array([0.3, 0.7, 0.1, 0.2, 0.7])
    heads = c.read_heads(probabilities)
    assert list(heads) == ["h1", "h2"] and heads["h2"].top == 2 and heads["h2"].shap_values is None
    np.testing.assert_array_equal(heads["h1"].probabilities, [0.3, 0.7])

    explained = np.arange(5 * 5, dtype=np.float64).reshape(5, 5)  # 3 features + base + probability
    heads = c.read_heads(explained)
    np.testing.assert_array_equal(heads["h2"].shap_values, explained[2:, :3])
    np.testing.assert_array_equal(heads["h2"].base_values, explained[2:, 3])
    np.testing.assert_array_equal(heads["h2"].probabilities, explained[2:, 4])
