"""NIfTI decoding: 3D/4D, NIfTI-2, gzip, real nibabel files, and every refusal (lying headers, bombs, 5-D, NaN)."""

from __future__ import annotations

import gzip
import struct

import nibabel as nib
import numpy as np
import pytest

from core.errors import ImageTooLarge, InvalidImageFormat
from preprocessing.nifti import decode_nifti, is_nifti
from tests.unit.mri.mri_inputs import NIBABEL_DATA, nifti_bytes

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
MAX = 10_000_000


def volume(shape=(6, 5, 4)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.int16).reshape(shape)


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("nifti2", [False, True])
def test_3d_round_trip(compressed: bool, nifti2: bool) -> None:
    data = nifti_bytes(volume(), AFFINE, compressed=compressed, nifti2=nifti2)
    assert is_nifti(data)
    [series] = decode_nifti(data, "dir/scan_flair.nii.gz", max_voxels=MAX)
    np.testing.assert_array_equal(series.data, volume())
    np.testing.assert_array_equal(series.affine, AFFINE)
    assert series.format == "nifti" and series.file_name == "scan_flair.nii.gz" and series.data.dtype == np.float32


def test_4d_file_gives_one_series_per_volume_and_scaling_applies() -> None:
    image = nib.Nifti1Image(np.stack([volume(), volume() * 2], axis=-1), AFFINE)
    image.header.set_slope_inter(0.5, 10.0)
    image.header["descrip"] = b"brats case"
    series = decode_nifti(image.to_bytes(), None, max_voxels=MAX)
    assert len(series) == 2 and series[0].description == "brats case"
    np.testing.assert_allclose(series[1].data, volume() * 2 * 0.5 + 10.0)


@pytest.mark.parametrize("name, count, shape", [
    ("anatomical.nii", 1, (33, 41, 25)), ("example4d.nii.gz", 2, (128, 96, 24)),
    ("example_nifti2.nii.gz", 2, (32, 20, 12)), ("functional.nii", 20, (17, 21, 3)),
])
def test_real_nibabel_files(name: str, count: int, shape: tuple) -> None:
    path = NIBABEL_DATA / name
    series = decode_nifti(path.read_bytes(), name, max_voxels=MAX)
    assert len(series) == count and series[0].data.shape == shape
    np.testing.assert_allclose(series[0].affine, nib.load(path).affine)


def test_lying_header_is_refused() -> None:
    data = nifti_bytes(volume(), AFFINE)
    header = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(data))
    header.set_data_shape((60, 50, 40))
    lying = header.binaryblock + data[348:]
    with pytest.raises(InvalidImageFormat, match="truncated or its header is wrong"):
        decode_nifti(lying, None, max_voxels=MAX)
    with pytest.raises(InvalidImageFormat, match="truncated or its header is wrong"):
        decode_nifti(gzip.compress(lying), None, max_voxels=MAX)


def test_header_announcing_too_many_voxels_is_refused_before_decompressing() -> None:
    with pytest.raises(ImageTooLarge, match="voxels"):
        decode_nifti(nifti_bytes(volume(), AFFINE, compressed=True), None, max_voxels=100)


def test_gzip_bomb_stops_at_the_announced_size() -> None:
    declared = nifti_bytes(volume((4, 4, 4)), AFFINE)
    bomb = gzip.compress(declared + b"\0" * 50_000_000)
    [series] = decode_nifti(bomb, None, max_voxels=MAX)
    assert series.data.shape == (4, 4, 4)


def test_multi_member_gzip_is_read_across_members() -> None:
    data = nifti_bytes(volume(), AFFINE)
    [series] = decode_nifti(gzip.compress(data[:500]) + gzip.compress(data[500:]), None, max_voxels=MAX)
    np.testing.assert_array_equal(series.data, volume())


@pytest.mark.parametrize("data, message", [
    (volume((3, 3, 3, 2, 2)), "5 dimensions"),
    (np.zeros((1, 1, 1), np.int16), "single voxel"),
    (np.zeros((4, 4, 0), np.int16), "empty dimension"),
])
def test_unusable_shapes_are_refused(data: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidImageFormat, match=message):
        decode_nifti(nifti_bytes(data, AFFINE), None, max_voxels=MAX)


def test_nan_volume_is_refused() -> None:
    data = volume().astype(np.float32)
    data[1, 1, 1] = np.nan
    with pytest.raises(InvalidImageFormat, match="NaN"):
        decode_nifti(nifti_bytes(data, AFFINE, dtype=np.float32), None, max_voxels=MAX)


def test_complex_voxels_are_refused() -> None:
    with pytest.raises(InvalidImageFormat, match="complex64"):
        decode_nifti(nifti_bytes(volume(), AFFINE, dtype=np.complex64), None, max_voxels=MAX)


def test_degenerate_affine_is_refused() -> None:
    data = bytearray(nifti_bytes(volume(), AFFINE))
    struct.pack_into("<hh", data, 252, 0, 1)  # qform_code 0, sform_code 1
    struct.pack_into("<4f", data, 312, 0.0, 0.0, 0.0, 0.0)  # srow_z = 0: a flat affine
    with pytest.raises(InvalidImageFormat, match="affine"):
        decode_nifti(bytes(data), None, max_voxels=MAX)


def test_header_pairs_and_garbage_are_refused() -> None:
    pair = nib.Nifti1Pair(volume(), AFFINE)
    header_only = pair.header.binaryblock
    with pytest.raises(InvalidImageFormat, match="single-file"):
        decode_nifti(header_only + b"\0" * 400, None, max_voxels=MAX)
    assert not is_nifti(b"hello world, not a header") and not is_nifti(b"ab")
    assert not is_nifti(nifti_bytes(volume(), AFFINE)[:344] + b"xyz\0")  # a size field alone is not enough
    with pytest.raises(InvalidImageFormat, match="not a NIfTI"):
        decode_nifti(gzip.compress(b"hello world, not a header" * 30), None, max_voxels=MAX)
    with pytest.raises(InvalidImageFormat, match="damaged"):
        decode_nifti(b"\x1f\x8b" + b"garbage" * 10, None, max_voxels=MAX)


def test_invalid_header_values_are_refused() -> None:
    data = bytearray(nifti_bytes(volume(), AFFINE))
    struct.pack_into("<h", data, 40, 9)  # dim[0] = 9: impossible
    with pytest.raises(InvalidImageFormat):
        decode_nifti(bytes(data), None, max_voxels=MAX)
