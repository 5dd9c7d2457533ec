"""DICOM series: grouping, slice order, LPS -> RAS affine equal to NIfTI's, real files, refusals, de-identification."""

from __future__ import annotations

import random
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO

from core.errors import ImageTooLarge, InvalidImageFormat
from preprocessing.dicom_series import (
    decode_dicom_series,
    deidentified_header,
    is_dicom,
)
from tests.unit.mri.mri_inputs import NIBABEL_DATA, case_dicom_files, small_case

MAX = 50_000_000


def decode(files: list[bytes], modalities=("MR",)):
    return [series for _, series in decode_dicom_series([(f"{i}.dcm", f) for i, f in enumerate(files)],
                                                        max_voxels=MAX, modalities=modalities)]


def edited(data: bytes, **changes) -> bytes:
    dataset = pydicom.dcmread(BytesIO(data))
    for keyword, value in changes.items():
        if value is None:
            delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
    buffer = DicomBytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def case():
    return small_case()


@pytest.fixture(scope="module")
def series_files(case):
    return case_dicom_files(case)


def test_series_round_trip_matches_voxels_and_affine_in_any_file_order(case, series_files) -> None:
    files = list(series_files["FLAIR"])
    random.Random(0).shuffle(files)
    [series] = decode(files)
    np.testing.assert_array_equal(series.data, case.volume.data[3])
    np.testing.assert_allclose(series.affine, case.volume.affine, atol=1e-4)
    assert series.description == "AX FLAIR" and series.acquisition["InversionTime"] == 2500.0
    assert series.acquisition["contrast"] == 0.0 and len(series.headers) == case.volume.shape[2]


def test_oblique_series_whose_slices_run_against_the_normal(case) -> None:
    """Slices are stored along row x column; the volume comes back reversed in z with an affine to match."""
    rotation = np.array([[0.0, 0.0, -1.0], [np.cos(0.3), np.sin(0.3), 0.0], [-np.sin(0.3), np.cos(0.3), 0.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.5, 1.2, 4.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    data = case.volume.data[0, :20, :16, :6]
    from training_export.synthetic_mri import dicom_series

    files = dicom_series(data, affine, "T1", patient_id="P1", study_uid="1.2.3", frame_of_reference_uid="1.2.4")
    [series] = decode(files)
    flip_z = np.eye(4)
    flip_z[2, 2], flip_z[2, 3] = -1.0, data.shape[2] - 1
    np.testing.assert_allclose(series.affine, affine @ flip_z, atol=1e-4)
    np.testing.assert_array_equal(series.data, data[:, :, ::-1])


def test_several_series_come_back_in_order_of_first_file(series_files) -> None:
    files = series_files["T2"][:3] + series_files["T1"] + series_files["T2"][3:]
    found = decode_dicom_series([(None, f) for f in files], max_voxels=MAX, modalities=None)
    assert [index for index, _ in found] == [0, 3]
    assert [s.description for _, s in found] == ["AX T2 TSE", "AX T1 SE"]


def test_nibabel_two_slice_series() -> None:
    files = [(NIBABEL_DATA / name).read_bytes() for name in ("1.dcm", "0.dcm")]
    [series] = decode(files)
    assert series.data.shape == (256, 256, 2)
    assert np.linalg.norm(series.affine[:3, 2]) == pytest.approx(3.0, abs=1e-3)
    reference = pydicom.dcmread(NIBABEL_DATA / "0.dcm")
    np.testing.assert_array_equal(series.data[:, :, 0], reference.pixel_array.T.astype(np.float32))


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm",
                                  "MR_small_jp2klossless.dcm", "MR_small_implicit.dcm", "MR_small_padded.dcm"])
def test_pydicom_single_mr_files(name: str) -> None:
    data = Path(get_testdata_file(name)).read_bytes()
    assert is_dicom(data)
    [series] = decode([data])
    assert series.data.shape == (64, 64, 1)
    assert np.linalg.norm(series.affine[:3, 2]) == pytest.approx(0.8)
    assert series.acquisition["EchoTime"] == pytest.approx(240.0)


def test_non_images_are_skipped_but_not_alone(series_files) -> None:
    report = Path(get_testdata_file("rtplan.dcm")).read_bytes()
    assert len(decode([report] + series_files["T1"])) == 1
    with pytest.raises(InvalidImageFormat, match="No DICOM image"):
        decode([report])


def test_refusals(series_files) -> None:
    t1 = series_files["T1"]
    with pytest.raises(InvalidImageFormat, match="modality"):
        decode(t1, modalities=("CT",))
    with pytest.raises(ImageTooLarge, match="voxels"):
        decode_dicom_series([(None, f) for f in t1], max_voxels=1000, modalities=None)
    with pytest.raises(InvalidImageFormat, match="share a position"):
        decode([t1[0], edited(t1[1], ImagePositionPatient=pydicom.dcmread(BytesIO(t1[0])).ImagePositionPatient)] + t1[2:])
    with pytest.raises(InvalidImageFormat, match="not evenly spaced"):
        decode(t1[:5] + t1[6:])
    with pytest.raises(InvalidImageFormat, match="differ in size or orientation"):
        decode([t1[0], edited(t1[1], ImageOrientationPatient=[0, 1, 0, 0, 0, 1])])
    with pytest.raises(InvalidImageFormat, match="lacks a valid ImagePositionPatient"):
        decode([edited(t1[0], ImagePositionPatient=None)])
    with pytest.raises(InvalidImageFormat, match="lacks a valid PixelSpacing"):
        decode([edited(t1[0], PixelSpacing=None)])
    with pytest.raises(InvalidImageFormat, match="invalid ImageOrientationPatient"):
        decode([edited(t1[0], ImageOrientationPatient=[1, 0, 0, 1, 0, 0])])
    with pytest.raises(InvalidImageFormat, match="non-positive PixelSpacing"):
        decode([edited(t1[0], PixelSpacing=[0, 1])])
    with pytest.raises(InvalidImageFormat, match="Multi-frame"):
        decode([edited(t1[0], NumberOfFrames=2)])
    with pytest.raises(InvalidImageFormat, match="truncated or damaged"):
        decode([b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00XI\x02\x00ab"])
    with pytest.raises(InvalidImageFormat, match="could not be decoded"):
        decode([Path(get_testdata_file("MR_truncated.dcm")).read_bytes()])


def test_single_slice_thickness_fallbacks(series_files) -> None:
    t1 = series_files["T1"][0]
    [series] = decode([edited(t1, SpacingBetweenSlices=None, SliceThickness=None)])
    assert np.linalg.norm(series.affine[:3, 2]) == pytest.approx(1.0)
    [series] = decode([edited(t1, SpacingBetweenSlices=None, SliceThickness="2.5")])
    assert np.linalg.norm(series.affine[:3, 2]) == pytest.approx(2.5)


def test_kept_headers_carry_no_identifiers_or_pixels(series_files) -> None:
    original = pydicom.dcmread(BytesIO(series_files["T1"][0]))
    original.PatientName, original.PatientBirthDate, original.InstitutionName = "Doe^Jane", "19700101", "General"
    original.add_new(0x00091001, "LO", "private secret")
    header = deidentified_header(original)
    assert header.PatientName == "" and header.PatientBirthDate == "" and "InstitutionName" not in header
    assert "PixelData" not in header and 0x00091001 not in header
    assert header.SeriesInstanceUID == original.SeriesInstanceUID and header.PatientID == "P0001"
