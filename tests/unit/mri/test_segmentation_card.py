"""The segmentation card: label rules (enhancing 3 or 4), regions, input spec consistency, store round trip."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.cards.segmentation import SegmentationLabel, SequenceRule, VolumeInputSpec
from tests.unit.mri.mri_inputs import card


def labels(enhancing_value: int = 4) -> list[SegmentationLabel]:
    return [SegmentationLabel(channel=0, value=0, name="background"),
            SegmentationLabel(channel=1, value=1, name="necrotic_core"),
            SegmentationLabel(channel=2, value=2, name="oedema"),
            SegmentationLabel(channel=3, value=enhancing_value, name="enhancing_tumor")]


@pytest.mark.parametrize("enhancing", [3, 4])
def test_enhancing_tumour_may_be_3_or_4(enhancing: int) -> None:
    segmentation = card(labels=labels(enhancing))
    assert segmentation.channel_values() == [0, 1, 2, enhancing]
    assert segmentation.region_values() == {"WT": [1, 2, enhancing], "TC": [1, enhancing], "ET": [enhancing]}
    assert [label.name for label in segmentation.tumor_labels()] == ["necrotic_core", "oedema", "enhancing_tumor"]


def test_regions_only_for_labels_the_model_has() -> None:
    two = [SegmentationLabel(channel=0, value=0, name="background"), SegmentationLabel(channel=1, value=2, name="oedema")]
    assert card(labels=two).region_values() == {"WT": [2]}


@pytest.mark.parametrize("broken, message", [
    (lambda ls: ls[:3] + [SegmentationLabel(channel=3, value=5, name="enhancing_tumor")], "3 or 4"),
    (lambda ls: ls[:3] + [SegmentationLabel(channel=5, value=4, name="enhancing_tumor")], "channels"),
    (lambda ls: ls[:3] + [SegmentationLabel(channel=3, value=2, name="enhancing_tumor")], "values must be unique"),
    (lambda ls: ls[:3] + [SegmentationLabel(channel=3, value=4, name="oedema")], "names must be unique"),
    (lambda ls: [SegmentationLabel(channel=0, value=7, name="background")] + ls[1:], "background must be label value 0"),
])
def test_inconsistent_labels_are_refused(broken, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        card(labels=broken(labels()))


def test_input_spec_checks() -> None:
    spec = VolumeInputSpec(optional_sequences=["T1", "T1ce"])
    assert spec.required_sequences() == ["T2", "FLAIR"]
    with pytest.raises(ValidationError, match="unique"):
        VolumeInputSpec(sequences=["T1", "T1"], optional_sequences=[], sequence_rules=[])
    with pytest.raises(ValidationError, match="unknown sequences"):
        VolumeInputSpec(sequences=["T1"], optional_sequences=["T2"], sequence_rules=[])
    with pytest.raises(ValidationError, match="unknown sequences"):
        VolumeInputSpec(sequences=["T1"], optional_sequences=[],
                        sequence_rules=[SequenceRule(sequence="PD", description_pattern="pd")])
    with pytest.raises(ValidationError, match="positive"):
        VolumeInputSpec(target_spacing_mm=(1.0, 0.0, 1.0))


def test_required_sequences_default_to_all_and_need_dropout_to_be_optional() -> None:
    old_input = {"sequences": ["T1", "T1ce", "T2", "FLAIR"], "target_spacing_mm": [2, 2, 2]}  # no new fields
    assert VolumeInputSpec.model_validate(old_input).required_sequences() == ["T1", "T1ce", "T2", "FLAIR"]
    assert VolumeInputSpec.model_validate(old_input).sequence_dropout is None
    with pytest.raises(ValidationError, match="without sequence dropout cannot have optional"):
        VolumeInputSpec(optional_sequences=["T2"], sequence_dropout=0.0)
    tolerant = VolumeInputSpec(optional_sequences=["T2"], sequence_dropout=0.15)
    assert tolerant.required_sequences() == ["T1", "T1ce", "FLAIR"]
    assert card().ood is None and card().volume_interval is None


def test_card_round_trips_through_json() -> None:
    original = card()
    assert type(original).model_validate(original.model_dump(mode="json")) == original


def test_architecture_size_multiple() -> None:
    from core.cards.segmentation import SegmentationArchitecture

    assert SegmentationArchitecture().size_multiple() == 8
    assert SegmentationArchitecture(kwargs={"blocks_down": [1, 1, 1]}).size_multiple() == 4
