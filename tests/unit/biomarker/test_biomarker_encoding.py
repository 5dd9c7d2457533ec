"""Request validation against the card (every bad field listed, none echoed) and the encoding training shares."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from biomarker_inputs import SPEC_EXAMPLE
from hypothesis import given, settings
from hypothesis import strategies as st

from core.cards import DEMO_INTENDED_USE, Provenance
from core.cards.tabular import HeadSpec, TabularCard
from core.errors import InvalidRequest
from preprocessing.tabular import MAX_REPORTED_PROBLEMS, encode_records, encode_request, stack_rows
from training_export.synthetic_biomarker import SHAPES, SPEC_FEATURES

CARD = TabularCard(
    name="spec", intended_use=DEMO_INTENDED_USE, provenance=Provenance(source="test", synthetic_data=True),
    features=list(SPEC_FEATURES), heads=[HeadSpec(name="tumor_type", classes=["a", "b"], model_file="t.ubj")],
)
NAMES = CARD.feature_names()


def with_change(path: str, value: object, delete: bool = False) -> dict:
    record = copy.deepcopy(SPEC_EXAMPLE)
    *parents, leaf = path.split(".")
    node = record
    for key in parents:
        node = node[key]
    if delete:
        del node[leaf]
    else:
        node[leaf] = value
    return record


def problems(record: object) -> list[dict]:
    with pytest.raises(InvalidRequest) as caught:
        encode_request(record, CARD)
    return caught.value.details["errors"]


def test_spec_example_encodes_in_card_order():
    encoded = encode_request(SPEC_EXAMPLE, CARD)
    row = dict(zip(NAMES, encoded.row))
    assert encoded.row.dtype == np.float32 and encoded.row.shape == (len(NAMES),)
    assert row["age"] == 67 and row["gender"] == 0 and row["tumor_markers.PSA"] == np.float32(28.0)
    assert row["genetic_markers.TP53_mutation"] == 1 and row["genetic_markers.EGFR_mutation"] == 0
    assert row["imaging_features.tumor_shape"] == SHAPES.index("irregular")
    assert encoded.values["imaging_features.tumor_shape"] == "irregular" and encoded.missing == []


def test_categories_match_case_insensitively_and_flags_accept_one_and_zero():
    record = with_change("gender", " Female ")
    record["genetic_markers"]["KRAS_mutation"] = 1
    encoded = encode_request(record, CARD)
    assert encoded.values["gender"] == "female" and encoded.values["genetic_markers.KRAS_mutation"] is True


@pytest.mark.parametrize("path", ["tumor_markers.CEA", "blood_test.platelet", "genetic_markers.EGFR_mutation"])
def test_missing_optional_values_encode_as_nan(path):
    for record in (with_change(path, None), with_change(path, None, delete=True)):
        encoded = encode_request(record, CARD)
        assert math.isnan(encoded.row[NAMES.index(path)]) and encoded.missing == [path]


def test_a_null_group_leaves_all_its_optional_values_missing():
    encoded = encode_request({**SPEC_EXAMPLE, "blood_test": None}, CARD)
    assert encoded.missing == [n for n in NAMES if n.startswith("blood_test.")]


@pytest.mark.parametrize("path, value, kind", [
    ("age", "67", "wrong_type"),
    ("age", True, "wrong_type"),
    ("age", [67], "wrong_type"),
    ("age", float("nan"), "not_finite"),
    ("tumor_markers.CEA", float("inf"), "not_finite"),
    ("age", 121, "out_of_range"),
    ("tumor_markers.PSA", -0.1, "out_of_range"),
    ("gender", 1, "wrong_type"),
    ("gender", "X", "unknown_category"),
    ("blood_test.WBC", {"value": 7.5, "unit": "mg"}, "wrong_unit"),
    ("blood_test.WBC", {"value": 7.5, "unit": "bogons/uL"}, "unknown_unit"),
    ("blood_test.WBC", {"value": 7.5}, "wrong_type"),
    ("blood_test.WBC", {"value": "7.5", "unit": "10^9/L"}, "wrong_type"),
    ("blood_test.WBC", {"value": 600, "unit": "10^9/L"}, "out_of_range"),
    ("genetic_markers.EGFR_mutation", "yes", "wrong_type"),
    ("genetic_markers.EGFR_mutation", 2, "wrong_type"),
    ("imaging_features.necrosis_present", 0.5, "wrong_type"),
    ("tumor_markers.CA19_9", 30.0, "unknown_field"),
    ("smoker", True, "unknown_field"),
])
def test_each_bad_field_is_named_with_its_problem(path, value, kind):
    found = problems(with_change(path, value))
    assert found == [{"loc": ["biomarkers", *path.split(".")], "msg": found[0]["msg"], "type": kind}]
    assert str(value) not in found[0]["msg"] or kind == "unknown_field"


@pytest.mark.parametrize("path", ["age", "gender", "imaging_features.tumor_size_mm", "imaging_features.necrosis_present"])
def test_required_fields_must_be_present_and_not_null(path):
    for record in (with_change(path, None), with_change(path, None, delete=True)):
        assert problems(record) == [{"loc": ["biomarkers", *path.split(".")], "msg": "required", "type": "missing"}]


def test_every_problem_is_listed_at_once():
    record = with_change("age", "old")
    record["gender"] = "x"
    record["tumor_markers"] = {"CEA": -1, "XYZ": 1}
    record["imaging_features"] = "big"
    record["extra"] = {}
    with pytest.raises(InvalidRequest) as caught:
        encode_request(record, CARD)
    error = caught.value
    locs = {".".join(p["loc"][1:]): p["type"] for p in error.details["errors"]}
    assert locs == {
        "age": "wrong_type", "gender": "unknown_category", "tumor_markers.CEA": "out_of_range",
        "tumor_markers.XYZ": "unknown_field", "imaging_features": "not_an_object", "extra": "unknown_field",
        "imaging_features.tumor_size_mm": "missing", "imaging_features.tumor_shape": "missing",
        "imaging_features.necrosis_present": "missing",
    }
    assert error.status == 400 and error.code == "INVALID_REQUEST" and error.details["error_count"] == 9
    assert "tumor_markers.CEA: must be within [0, 100000] ng/mL" in error.message


def test_the_body_must_be_an_object():
    found = problems([1, 2])
    assert found[0]["loc"] == ["biomarkers"] and found[0]["type"] == "not_an_object"
    assert {p["type"] for p in found[1:]} == {"missing"}


def test_a_flood_of_unknown_fields_gives_a_bounded_error():
    found = problems({**SPEC_EXAMPLE, **{f"junk{i}": i for i in range(500)}})
    assert len(found) == MAX_REPORTED_PROBLEMS


def test_many_records_locate_problems_by_index():
    with pytest.raises(InvalidRequest) as caught:
        encode_records([SPEC_EXAMPLE, with_change("age", -5)], CARD)
    assert caught.value.details["errors"][0]["loc"] == ["1", "age"]
    rows = stack_rows(encode_records([SPEC_EXAMPLE, SPEC_EXAMPLE], CARD))
    assert rows.shape == (2, len(NAMES)) and rows.dtype == np.float32


@settings(max_examples=60, deadline=None)
@given(age=st.floats(0, 120), cea=st.one_of(st.none(), st.floats(0, 100_000)), flag=st.booleans(),
       shape=st.sampled_from(SHAPES), gender=st.sampled_from(["male", "FEMALE", "m", "F", "O", "Other"]))
def test_any_valid_record_encodes_to_its_values(age, cea, flag, shape, gender):
    record = copy.deepcopy(SPEC_EXAMPLE)
    record.update(age=age, gender=gender)
    record["tumor_markers"]["CEA"] = cea
    record["genetic_markers"]["KRAS_mutation"] = flag
    record["imaging_features"]["tumor_shape"] = shape
    row = dict(zip(NAMES, encode_request(record, CARD).row))
    assert row["age"] == np.float32(age) and row["genetic_markers.KRAS_mutation"] == float(flag)
    assert row["imaging_features.tumor_shape"] == SHAPES.index(shape)
    assert row["gender"] == ["m", "f", "o"].index(gender[0].lower())
    assert math.isnan(row["tumor_markers.CEA"]) if cea is None else row["tumor_markers.CEA"] == np.float32(cea)


@pytest.mark.parametrize("given, expected", [
    (7500, 7500.0),
    ({"value": 7500, "unit": "/uL"}, 7500.0),
    ({"value": 7.5, "unit": "10^9/L"}, 7500.0),
    ({"value": 7.5, "unit": "10*3/uL"}, 7500.0),
    ({"value": 7500, "unit": "{cells}/µL"}, 7500.0),
])
def test_a_value_in_any_convertible_unit_encodes_in_the_cards_unit(given, expected):
    assert CARD.features[NAMES.index("blood_test.WBC")].unit == "/uL"
    encoded = encode_request(with_change("blood_test.WBC", given), CARD)
    assert encoded.values["blood_test.WBC"] == pytest.approx(expected)


def test_an_out_of_range_or_wrong_unit_names_the_field_and_the_expected_unit():
    with pytest.raises(InvalidRequest) as caught:
        encode_request(with_change("blood_test.platelet", {"value": 250, "unit": "g/dL"}), CARD)
    assert "blood_test.platelet" in caught.value.message and "'g/dL'" in caught.value.message
    assert "/uL" in caught.value.message
    with pytest.raises(InvalidRequest) as caught:
        encode_request(with_change("blood_test.platelet", 4_000_000), CARD)
    assert "blood_test.platelet: must be within [0, 3e+06] /uL" in caught.value.message


@pytest.mark.parametrize("code, category", [("M", "male"), ("f", "female"), ("O", "other"), ("Male", "male")])
def test_standard_sex_codes_stand_for_their_category(code, category):
    assert encode_request(with_change("gender", code), CARD).values["gender"] == category
