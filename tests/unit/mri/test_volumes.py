"""From uploads to the model tensor: sequence matching, one grid, NIfTI == DICOM, reorientation and resampling."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from core.cards.segmentation import MRI_SEQUENCES, SequenceRule, VolumeInputSpec
from core.errors import ImageTooLarge, InvalidImageFormat, InvalidRequest
from core.volumes import RawSeries
from preprocessing.sequences import parse_sequence_types
from preprocessing.volumes import (
    decode_upload,
    prepare_labels,
    prepare_volume,
    resample_to_grid,
)
from tests.unit.mri.mri_inputs import (
    LIMITS,
    NIBABEL_DATA,
    case_dicom_files,
    four_d_nifti,
    nifti_bytes,
    small_case,
    temp_dir_entries,
    zip_bytes,
)

SPEC = VolumeInputSpec(target_spacing_mm=(3.0, 3.0, 3.0), optional_sequences=list(MRI_SEQUENCES),
                       sequence_dropout=0.2)


@pytest.fixture(scope="module")
def case():
    return small_case()


@pytest.fixture(scope="module")
def dicom_files(case):
    return case_dicom_files(case)


def test_sequence_type_parsing() -> None:
    assert parse_sequence_types(None, SPEC) is None and parse_sequence_types(" , ", SPEC) is None
    assert parse_sequence_types("t1c, FLAIR", SPEC) == ["T1ce", "FLAIR"]
    assert parse_sequence_types(["T1-CE", "t2_w", "T2 FLAIR"], SPEC) == ["T1ce", "T2", "FLAIR"]
    with pytest.raises(InvalidRequest, match="unknown sequence_type"):
        parse_sequence_types("DWI", SPEC)


def test_4d_nifti_in_card_order(case) -> None:
    volume = decode_upload([("case.nii.gz", four_d_nifti(case, compressed=True))], SPEC, LIMITS)
    assert volume.sequences == ("T1", "T1ce", "T2", "FLAIR") and volume.format == "nifti"
    assert {source.matched_by for source in volume.sources} == {"volume_order"}
    np.testing.assert_array_equal(volume.data, case.volume.data)
    np.testing.assert_array_equal(volume.affine, case.volume.affine)
    assert volume.spacing == (4.0, 4.0, 5.0) and volume.voxel_volume_mm3 == pytest.approx(80.0)


def test_files_named_by_sequence_type_or_by_file_name(case) -> None:
    flair = nifti_bytes(case.volume.data[3], case.volume.affine)
    t2 = nifti_bytes(case.volume.data[2], case.volume.affine)
    named = decode_upload([("a.nii", flair), ("b.nii", t2)], SPEC, LIMITS, ["FLAIR", "T2"])
    assert named.sequences == ("T2", "FLAIR") and named.source_of("FLAIR").matched_by == "sequence_type"
    np.testing.assert_array_equal(named.data[1], case.volume.data[3])
    by_name = decode_upload([("BraTS_001_flair.nii", flair), ("BraTS_001_t2.nii", t2)], SPEC, LIMITS)
    assert by_name.sequences == ("T2", "FLAIR") and by_name.source_of("T2").matched_by == "description"


def test_sequence_type_must_fit_the_volumes(case) -> None:
    flair = nifti_bytes(case.volume.data[3], case.volume.affine)
    with pytest.raises(InvalidRequest, match="names 2 sequence"):
        decode_upload([("a.nii", flair)], SPEC, LIMITS, ["T2", "FLAIR"])
    with pytest.raises(InvalidRequest, match="twice"):
        decode_upload([("a.nii", flair), ("b.nii", flair)], SPEC, LIMITS, ["T2", "T2"])
    with pytest.raises(InvalidRequest, match="could not tell which sequence"):
        decode_upload([("scan.nii", flair)], SPEC, LIMITS)
    with pytest.raises(InvalidRequest, match="no image"):
        decode_upload([], SPEC, LIMITS)
    with pytest.raises(InvalidImageFormat, match="neither NIfTI"):
        decode_upload([("x.txt", b"plain text, not an image")], SPEC, LIMITS)


def test_nifti_and_dicom_series_give_the_same_volume(case, dicom_files) -> None:
    files = [(f"{sequence}/{i}.dcm", data) for sequence, series in dicom_files.items() for i, data in enumerate(series)]
    from_dicom = decode_upload(files, SPEC, LIMITS)
    from_nifti = decode_upload([("case.nii", four_d_nifti(case))], SPEC, LIMITS)
    assert from_dicom.format == "dicom" and from_dicom.sequences == from_nifti.sequences
    assert {s.matched_by for s in from_dicom.sources} == {"description"}
    np.testing.assert_array_equal(from_dicom.data, from_nifti.data)
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-4)
    assert from_dicom.source_of("T1ce").series_uid and len(from_dicom.source_of("T1").headers) == case.volume.shape[2]


def test_study_zip_matched_by_acquisition_tags_and_finest_duplicate(case, dicom_files, private_temp_dir) -> None:
    from tests.unit.mri.test_dicom_series import edited

    anonymous = {s: [edited(f, SeriesDescription=None) for f in files] for s, files in dicom_files.items()}
    coarse_t1 = case_dicom_files(type(case)(volume=case.volume, labels=case.labels), sequences=("T1",))["T1"][::2]
    coarse_t1 = [edited(f, SeriesDescription=None, SpacingBetweenSlices=10) for f in coarse_t1]
    members = {f"study/{s}/{i}.dcm": f for s, files in anonymous.items() for i, f in enumerate(files)}
    members.update({f"study/coarse/{i}.dcm": f for i, f in enumerate(coarse_t1)})
    before = temp_dir_entries()
    volume = decode_upload([("study.zip", zip_bytes(members))], SPEC, LIMITS)
    assert temp_dir_entries() - before == set()
    assert volume.sequences == ("T1", "T1ce", "T2", "FLAIR")
    assert {s.matched_by for s in volume.sources} == {"acquisition_tags"}
    assert volume.source_of("T1").slices == case.volume.shape[2]
    np.testing.assert_array_equal(volume.data, case.volume.data)


def test_unmatched_series_and_required_sequences(case, dicom_files) -> None:
    from tests.unit.mri.test_dicom_series import edited

    unknown = [edited(f, SeriesDescription="localizer", RepetitionTime=None, EchoTime=None) for f in dicom_files["T2"]]
    volume = decode_upload([(None, f) for f in unknown + dicom_files["FLAIR"]], SPEC, LIMITS)
    assert volume.sequences == ("FLAIR",)
    strict = VolumeInputSpec(optional_sequences=["T1", "T1ce", "T2"])
    with pytest.raises(InvalidRequest, match=r"lacks required sequence\(s\) \['FLAIR'\]") as refused:
        decode_upload([(None, f) for f in dicom_files["T2"]], strict, LIMITS)
    assert refused.value.details == {"reason": "missing_required_sequences", "missing": ["FLAIR"],
                                     "required": ["FLAIR"], "received": ["T2"]}
    with pytest.raises(InvalidRequest, match=r"\['T1', 'T1ce', 'T2'\]"):  # an old card: every sequence required
        decode_upload([(None, f) for f in dicom_files["FLAIR"]], VolumeInputSpec(), LIMITS)
    with pytest.raises(InvalidRequest, match="could not tell"):
        decode_upload([(None, f) for f in unknown], SPEC, LIMITS)


def test_single_sequence_model_takes_its_only_sequence(case) -> None:
    spec = VolumeInputSpec(sequences=["FLAIR"], optional_sequences=[], sequence_rules=[])
    volume = decode_upload([("x.nii", nifti_bytes(case.volume.data[3], case.volume.affine))], spec, LIMITS)
    assert volume.source_of("FLAIR").matched_by == "only_sequence"


def test_rule_with_contrast_condition() -> None:
    from preprocessing.volumes import _rule_match

    rule = SequenceRule(sequence="T1ce", description_pattern="^never$", tag_ranges={"EchoTime": (0, 30)},
                        contrast="with")
    raw = RawSeries(data=np.zeros((2, 2, 2), np.float32), affine=np.eye(4), format="dicom",
                    acquisition={"EchoTime": 10.0, "contrast": 1.0})
    assert _rule_match(raw, [rule]) == ("T1ce", "acquisition_tags")
    assert _rule_match(RawSeries(**{**raw.__dict__, "acquisition": {"EchoTime": 10.0, "contrast": 0.0}}), [rule]) is None


def test_sequences_on_other_grids_are_resampled_onto_the_finest(case) -> None:
    fine = nifti_bytes(case.volume.data[3], case.volume.affine)
    coarse_affine = case.volume.affine @ np.diag([2.0, 2.0, 1.0, 1.0])
    coarse = nifti_bytes(case.volume.data[2][::2, ::2, :], coarse_affine)
    volume = decode_upload([("t2.nii", coarse), ("flair.nii", fine)], SPEC, LIMITS, ["T2", "FLAIR"])
    assert volume.reference_sequence == "FLAIR" and volume.shape == case.volume.shape
    np.testing.assert_allclose(volume.data[0][::2, ::2, :][:-1, :-1], case.volume.data[2][::2, ::2, :][:-1, :-1],
                               rtol=1e-5, atol=0.01)


def test_voxel_budget_is_shared_by_all_files(case) -> None:
    data = four_d_nifti(case)
    with pytest.raises(ImageTooLarge):
        decode_upload([("a.nii", data), ("b.nii", data)], SPEC, LIMITS.model_copy(
            update={"max_volume_voxels": case.volume.data.size + 10}))


def test_prepare_reorients_resamples_normalises_and_zero_fills(case) -> None:
    flipped = nib.Nifti1Image(np.moveaxis(case.volume.data, 0, -1), case.volume.affine).as_reoriented(
        [[0, -1], [2, 1], [1, -1]])
    volume = decode_upload([("flipped.nii", flipped.to_bytes())], SPEC, LIMITS)
    assert nib.aff2axcodes(volume.affine) != ("R", "A", "S")
    prepared = prepare_volume(volume, SPEC, LIMITS.max_volume_voxels)
    assert nib.aff2axcodes(prepared.affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.linalg.norm(prepared.affine[:3, :3], axis=0), (3.0, 3.0, 3.0))
    direct = prepare_volume(case.volume, SPEC, LIMITS.max_volume_voxels)
    np.testing.assert_allclose(prepared.tensor, direct.tensor, atol=1e-4)
    np.testing.assert_allclose(prepared.affine, direct.affine, atol=1e-4)
    head = direct.tensor[0][direct.tensor[0] != 0]
    assert abs(head.mean()) < 0.05 and abs(head.std() - 1) < 0.05
    labels = prepare_labels(case.labels, case.volume.affine, SPEC)
    assert labels.shape == direct.tensor.shape[1:] and set(np.unique(labels)) <= {0, 1, 2, 4}

    flair_only = decode_upload([("x.nii", nifti_bytes(case.volume.data[3], case.volume.affine))], SPEC, LIMITS, ["FLAIR"])
    partial = prepare_volume(flair_only, SPEC, LIMITS.max_volume_voxels)
    assert partial.missing_sequences == ("T1", "T1ce", "T2") and not partial.tensor[:3].any()
    np.testing.assert_allclose(partial.tensor[3], direct.tensor[3], atol=1e-5)


def test_model_grid_size_is_checked_before_resampling(case) -> None:
    huge = case.volume.affine @ np.diag([50.0, 50.0, 50.0, 1.0])
    volume = decode_upload([("x.nii", nifti_bytes(case.volume.data[3], huge))], SPEC, LIMITS, ["FLAIR"])
    with pytest.raises(ImageTooLarge, match="model's spacing"):
        prepare_volume(volume, SPEC, LIMITS.max_volume_voxels)


def test_resample_to_grid_is_exact_for_whole_voxel_shifts(case) -> None:
    data = case.volume.data[:1]
    assert np.array_equal(resample_to_grid(data, case.volume.affine, case.volume.affine, case.volume.shape, "nearest"), data)
    shifted = case.volume.affine.copy()
    shifted[:3, 3] += shifted[:3, 0]
    moved = resample_to_grid(data, case.volume.affine, shifted, case.volume.shape, "nearest")
    np.testing.assert_array_equal(moved[0, :-1], data[0, 1:])
    assert not moved[0, -1].any()


def test_real_nibabel_volumes_prepare() -> None:
    anatomical = (NIBABEL_DATA / "anatomical.nii").read_bytes()
    volume = decode_upload([("anatomical.nii", anatomical)], SPEC, LIMITS, ["T1"])
    prepared = prepare_volume(volume, SPEC, LIMITS.max_volume_voxels)
    assert prepared.tensor.shape[0] == 4 and np.isfinite(prepared.tensor).all()
