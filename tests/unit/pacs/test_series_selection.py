"""Series selection by rules: a synthetic 4-sequence brain MR study, CT slices, an ultrasound that matches nothing,
our own result series ignored, ties broken deterministically, missing or malformed attributes never crash."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pydicom
import pytest
from pydantic import ValidationError
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from core.cards.base import DEMO_INTENDED_USE, Provenance
from core.cards.classification import CT_CLASSES, ClassificationCard
from pacs.selection import FACT_KEYWORDS, ModelRules, SeriesFacts, SeriesRule, is_our_output, orientation, select_series
from postprocessing.dicom_results import OUR_MANUFACTURER, ct_overlay_capture
from tests.unit.mri.mri_inputs import case_dicom_files
from training_export.synthetic_ct import generate_ct_slice, write_ct_dicom
from training_export.synthetic_mri import synthetic_case

MRI_RULES = ModelRules.model_validate({
    "model_id": "mri_segmentation",
    "series": {
        "t1": {"modality": "MR", "series_description": r"t1(?!.*(post|gad|\+c))", "orientation": "axial"},
        "t1ce": {"modality": "MR", "series_description": r"t1.*(post|gad|\+c)", "orientation": "axial"},
        "t2": {"modality": "MR", "series_description": r"\bt2\b", "orientation": "axial"},
        "flair": {"modality": "MR", "series_description": "flair", "orientation": "axial", "min_instances": 5},
    },
})
CT_RULES = ModelRules(model_id="ct_classification", series={
    "slice": SeriesRule(modality="CT", max_slice_thickness_mm=10, orientation="axial"),
})
ROLE_OF_SEQUENCE = {"T1": "t1", "T1ce": "t1ce", "T2": "t2", "FLAIR": "flair"}


def metadata(data: bytes | Dataset) -> Dataset:
    """One instance's attributes as WADO-RS series metadata delivers them: DICOM JSON, without pixel data."""
    ds = data if isinstance(data, Dataset) else pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    ds = ds.copy()
    if "PixelData" in ds:
        del ds.PixelData
    return Dataset.from_json(ds.to_json_dict())


@pytest.fixture(scope="module")
def mr_study() -> dict[str, list[bytes]]:
    case = synthetic_case(1, (24, 24, 10), (2.0, 2.0, 3.0))
    return case_dicom_files(case)


@pytest.fixture(scope="module")
def mr_facts(mr_study) -> dict[str, SeriesFacts]:
    return {sequence: SeriesFacts.from_instance(metadata(files[0]), len(files)) for sequence, files in mr_study.items()}


@pytest.fixture(scope="module")
def ct_slice(tmp_path_factory) -> Dataset:
    path = tmp_path_factory.mktemp("ct") / "slice.dcm"
    write_ct_dicom(generate_ct_slice(np.random.default_rng(5), "Glioma", size=64)[0], path)
    return pydicom.dcmread(path)


def test_a_four_sequence_mr_study_gives_each_role_its_series(mr_study, mr_facts) -> None:
    flair = mr_facts["FLAIR"]
    assert (flair.modality, flair.description, flair.orientation) == ("MR", "AX FLAIR", "axial")
    assert flair.instance_count == 10
    assert flair.slice_thickness_mm == pytest.approx(3.0) and flair.series_number == 4
    assert not is_our_output(flair)  # the synthetic scanner's Manufacturer is "NeuroNova synthetic", not ours

    selection = select_series(MRI_RULES, list(mr_facts.values())[::-1])

    assert selection.matched and selection.reason is None and selection.model_id == "mri_segmentation"
    assert selection.series == {ROLE_OF_SEQUENCE[s]: facts.series_uid for s, facts in mr_facts.items()}
    assert list(selection.series) == list(MRI_RULES.series)  # roles in the rules' order


def test_the_fact_keywords_are_all_selection_reads(mr_study, mr_facts, ct_slice) -> None:
    """What a QIDO-RS search with includefield=FACT_KEYWORDS returns gives the same facts as the full metadata."""
    for full in (pydicom.dcmread(io.BytesIO(mr_study["T2"][0])), ct_slice):
        searched = Dataset()
        for keyword in FACT_KEYWORDS:
            if keyword in full:
                searched[keyword] = full[keyword]
        assert SeriesFacts.from_instance(searched, 7) == SeriesFacts.from_instance(metadata(full), 7)


def test_a_series_serves_one_role_even_where_a_greedy_choice_would_starve_another(mr_facts) -> None:
    """t1 accepts both T1 series; the post-contrast one is preferred (more instances), yet t1ce needs it."""
    rules = ModelRules(model_id="mri_segmentation", series={
        "t1": SeriesRule(series_description="t1"), "t1ce": SeriesRule(series_description="post gad"),
    })
    t1, t1ce = mr_facts["T1"], replace(mr_facts["T1ce"], instance_count=50)

    selection = select_series(rules, [t1, t1ce])

    assert selection.series == {"t1": t1.series_uid, "t1ce": t1ce.series_uid}


def test_ties_are_broken_by_instances_then_series_number_then_uid(mr_facts) -> None:
    flair = mr_facts["FLAIR"]
    fewer = replace(flair, series_uid="1.2.3.1", instance_count=flair.instance_count - 1, series_number=1)
    later = replace(flair, series_uid="1.2.3.2", series_number=flair.series_number + 10)
    unnumbered = replace(flair, series_uid="1.2.3.0", series_number=None)
    rules = ModelRules(model_id="mri_segmentation", series={"flair": MRI_RULES.series["flair"]})

    for order in ([fewer, later, unnumbered, flair], [flair, unnumbered, later, fewer]):
        assert select_series(rules, order).series == {"flair": flair.series_uid}
    twin = replace(flair, series_uid="1.2.0")
    assert select_series(rules, [flair, twin]).series == {"flair": "1.2.0"}


def test_a_missing_sequence_names_the_role_and_the_rule(mr_facts) -> None:
    without_flair = [facts for sequence, facts in mr_facts.items() if sequence != "FLAIR"]

    selection = select_series(MRI_RULES, without_flair)

    assert not selection.matched and selection.series == {}
    assert selection.reason == ("flair: no series with modality MR, description /flair/, axial orientation, "
                                "at least 5 instances")


def test_a_study_too_short_for_every_role_says_which_role_goes_without(mr_facts) -> None:
    rules = ModelRules(model_id="mri_segmentation", series={
        "t1": SeriesRule(series_description="t1"), "t1ce": SeriesRule(series_description="t1"),
        "t1_again": SeriesRule(series_description="t1"),
    })

    selection = select_series(rules, [mr_facts["T1"], mr_facts["T1ce"]])

    assert selection.reason == "t1_again: every series with description /t1/ is needed by another role (t1, t1ce)"


def test_a_ct_slice_matches_the_ct_rules(ct_slice) -> None:
    facts = SeriesFacts.from_instance(metadata(ct_slice), 1)
    assert (facts.modality, facts.orientation, facts.slice_thickness_mm) == ("CT", "axial", 5.0)
    assert facts.image_type == ("DERIVED", "SECONDARY", "AXIAL")

    assert select_series(CT_RULES, [facts]).series == {"slice": ct_slice.SeriesInstanceUID}
    original_only = ModelRules(model_id="ct_classification",
                               series={"slice": SeriesRule(image_type_contains=["original"])})
    assert select_series(original_only, [facts]).reason == "slice: no series with image type with ORIGINAL"
    small = SeriesFacts.from_instance(metadata(pydicom.dcmread(get_testdata_file("CT_small.dcm"))), 1)
    assert select_series(CT_RULES, [small]).matched


def test_an_ultrasound_study_matches_no_model_and_says_why() -> None:
    ultrasound = SeriesFacts.from_instance(metadata(pydicom.dcmread(get_testdata_file("examples_rgb_color.dcm"))), 1)
    assert ultrasound.modality == "US" and ultrasound.orientation is None

    mri, ct = select_series(MRI_RULES, [ultrasound]), select_series(CT_RULES, [ultrasound])

    assert mri.reason == "t1: no series with modality MR, description /t1(?!.*(post|gad|\\+c))/, axial orientation"
    assert ct.reason == "slice: no series with modality CT, slice thickness <= 10 mm, axial orientation"
    assert not mri.matched and not ct.matched


def test_our_own_result_series_never_trigger_a_run(ct_slice) -> None:
    card = ClassificationCard(name="test classifier", intended_use=DEMO_INTENDED_USE, labels=list(CT_CLASSES),
                              provenance=Provenance(source="tests", synthetic_data=True))
    overlay = np.zeros((ct_slice.Rows, ct_slice.Columns, 3), np.uint8)
    capture = SeriesFacts.from_instance(metadata(ct_overlay_capture(ct_slice, overlay, card, "neuronova-ct:v1")), 1)
    assert is_our_output(capture) and capture.manufacturer == OUR_MANUFACTURER
    assert capture.software_versions == ("neuronova-ct:v1",)

    anything = ModelRules(model_id="ct_classification", series={"slice": SeriesRule()})
    assert select_series(anything, [capture]).reason == "slice: no series with any attributes"
    source = SeriesFacts.from_instance(metadata(ct_slice), 1)
    assert select_series(anything, [capture, source]).series == {"slice": ct_slice.SeriesInstanceUID}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_missing_or_malformed_attributes_match_no_criterion_and_never_crash() -> None:
    bare = Dataset()
    bare.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    facts = SeriesFacts.from_instance(bare, 3)
    assert facts == SeriesFacts(series_uid="1.2.826.0.1.3680043.8.498.1", instance_count=3)
    malformed = Dataset()  # values as a sloppy modality writes them; pydicom reads them as text, with a warning
    for tag, vr, value in ((0x0020000E, "UI", b"1.2.3"), (0x00200037, "DS", b"1\\0\\0\\0\\1"),
                           (0x00180050, "DS", b"thick"), (0x00200011, "IS", b"1.5"), (0x00080008, "CS", b"")):
        malformed[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, True, True)
    assert SeriesFacts.from_instance(malformed, 1) == SeriesFacts(series_uid="1.2.3", instance_count=1)

    for criterion in ({"modality": "MR"}, {"series_description": "."}, {"min_slice_thickness_mm": 0},
                      {"max_slice_thickness_mm": 100}, {"image_type_contains": ["ORIGINAL"]},
                      {"orientation": "axial"}):
        assert not SeriesRule.model_validate(criterion).matches(facts), criterion
    assert SeriesRule().matches(facts) and SeriesRule(min_instances=3).matches(facts)
    assert select_series(ModelRules(model_id="ct_classification", series={"slice": SeriesRule()}),
                         [SeriesFacts(series_uid="", instance_count=9)]).reason is not None  # no UID: unusable


def test_orientation_follows_the_normal_of_the_image_plane() -> None:
    assert orientation([1, 0, 0, 0, 1, 0]) == "axial"
    assert orientation([0, 1, 0, 0, 0, -1]) == "sagittal"
    assert orientation([1, 0, 0, 0, 0, -1]) == "coronal"
    assert orientation([0.98, 0.17, 0, -0.17, 0.98, 0.05]) == "axial"  # slightly tilted
    assert orientation(None) is None and orientation([1, 0, 0, 1, 0, 0]) is None and orientation([1, 0]) is None


@pytest.mark.parametrize("rules, message", [
    ({"model_id": "mri_segmentation", "series": {"t1": {"series_description": "t1("}}}, "not a valid regex"),
    ({"model_id": "mri_segmentation", "series": {"t1": {"min_slice_thickness_mm": 5, "max_slice_thickness_mm": 1}}},
     "exceeds"),
    ({"model_id": "biomarker_prediction", "series": {"t1": {}}}, "model_id"),
    ({"model_id": "ct_classification", "series": {}}, "series"),
    ({"model_id": "ct_classification", "series": {"slice": {"orientation": "oblique"}}}, "orientation"),
    ({"model_id": "ct_classification", "series": {"slice": {"modalty": "CT"}}}, "modalty"),
])
def test_invalid_rules_are_refused_when_read(rules: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelRules.model_validate(rules)
