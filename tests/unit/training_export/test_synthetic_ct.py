"""The synthetic CT generator: deterministic, anatomically plausible HU, and each class's lesion where it belongs."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from core.cards import CT_CLASSES
from core.settings import get_settings
from preprocessing.decode import decode_slice
from training_export.synthetic_ct import (
    AIR_HU,
    generate_ct_dataset,
    generate_ct_slice,
    write_ct_dicom,
)

SIZE = 128
PER_CLASS = 6


@pytest.fixture(scope="module")
def dataset() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return generate_ct_dataset(PER_CLASS, seed=11, size=SIZE)


def _of_class(dataset, name: str):
    images, masks, labels = dataset
    index = CT_CLASSES.index(name)
    return [(images[i], masks[i]) for i in np.flatnonzero(labels == index)]


def _air_distance(hu: np.ndarray, mask: np.ndarray) -> float:
    """Smallest distance (px) from the lesion to the air around the head."""
    return float(ndimage.distance_transform_edt(hu > -500)[mask].min())


def _head_centroid(hu: np.ndarray) -> np.ndarray:
    return np.array(ndimage.center_of_mass(ndimage.binary_fill_holes(hu > -500)))


def _brain_hu(hu: np.ndarray, mask: np.ndarray) -> float:
    """Median HU of the parenchyma (soft tissue inside the skull) away from the lesion."""
    soft = (hu > 15) & (hu < 45) & ~ndimage.binary_dilation(mask, iterations=6)
    return float(np.median(hu[soft]))


def test_same_seed_same_data_other_seed_other_data() -> None:
    first, second, other = (generate_ct_dataset(1, seed, size=64) for seed in (3, 3, 4))
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


def test_shapes_types_and_interleaved_labels(dataset) -> None:
    images, masks, labels = dataset
    assert images.shape == masks.shape == (PER_CLASS * len(CT_CLASSES), SIZE, SIZE)
    assert images.dtype == np.float32 and masks.dtype == bool and labels.dtype == np.int64
    assert labels[: len(CT_CLASSES)].tolist() == list(range(len(CT_CLASSES)))
    assert np.bincount(labels).tolist() == [PER_CLASS] * len(CT_CLASSES)


def test_default_size_is_256() -> None:
    hu, mask = generate_ct_slice(np.random.default_rng(0), "No Tumor")
    assert hu.shape == mask.shape == (256, 256)


def test_head_anatomy_in_hounsfield_units(dataset) -> None:
    for hu in dataset[0]:
        assert abs(float(np.median(hu[:8, :8])) - AIR_HU) < 30  # air corner
        assert 700 <= np.percentile(hu, 99.5) <= 1600  # skull
        assert 24 <= _brain_hu(hu, np.zeros_like(hu, bool)) <= 40  # parenchyma
        assert (hu < 15).sum() > 0.005 * hu.size  # ventricles (CSF) inside the head, besides the air
        assert ((hu > -100) & (hu < 15)).any()


def test_no_tumor_has_an_empty_mask(dataset) -> None:
    assert all(not mask.any() for _, mask in _of_class(dataset, "No Tumor"))


def test_meningioma_is_hyperdense_and_based_on_the_inner_table(dataset) -> None:
    for hu, mask in _of_class(dataset, "Meningioma"):
        assert mask.sum() > 20
        bone_next_to_lesion = ndimage.binary_dilation(mask, iterations=2) & (hu > 400)
        assert bone_next_to_lesion.sum() >= 5
        assert _air_distance(hu, mask) < 0.1 * SIZE
        assert np.median(hu[mask]) > _brain_hu(hu, mask) + 10


def test_glioma_is_intra_axial_hypodense_and_irregular(dataset) -> None:
    for hu, mask in _of_class(dataset, "Glioma"):
        assert mask.sum() > 20
        assert _air_distance(hu, mask) > 0.1 * SIZE
        assert np.median(hu[mask]) < _brain_hu(hu, mask) - 5
        filled = ndimage.binary_fill_holes(mask)
        eroded_opened = ndimage.binary_opening(filled, iterations=2)
        assert (filled & ~eroded_opened).sum() > 0  # a ragged edge that an opening removes


def test_pituitary_sits_low_on_the_midline(dataset) -> None:
    for hu, mask in _of_class(dataset, "Pituitary"):
        row, column = np.array(ndimage.center_of_mass(mask)) - _head_centroid(hu)
        assert abs(column) < 0.05 * SIZE
        assert row > 0.2 * SIZE
        assert mask.sum() < 0.02 * SIZE * SIZE
        assert np.median(hu[mask]) > _brain_hu(hu, mask) + 8


def test_unknown_class_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown class"):
        generate_ct_slice(np.random.default_rng(0), "Astrocytoma")


def test_dicom_round_trip_keeps_hounsfield_units_and_no_names(tmp_path) -> None:
    hu, _ = generate_ct_slice(np.random.default_rng(1), "Meningioma", size=96)
    path = tmp_path / "slice.dcm"
    write_ct_dicom(hu, path, patient_id="P123456")

    ds = pydicom.dcmread(path)
    assert ds.Modality == "CT" and ds.PatientID == "P123456" and str(ds.PatientName) == ""
    assert (ds.Rows, ds.Columns) == hu.shape
    stored_hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(stored_hu, np.rint(hu), atol=0)

    decoded = decode_slice(path.read_bytes(), path.name, max_pixels=get_settings().limits.max_image_pixels)
    assert decoded.intensity == "hounsfield" and decoded.source.modality == "CT"
    np.testing.assert_allclose(decoded.pixels, np.rint(hu), atol=1e-3)


def test_dicom_writer_refuses_identifying_patient_ids(tmp_path) -> None:
    with pytest.raises(ValueError, match="anonymised"):
        write_ct_dicom(np.zeros((8, 8), np.float32), tmp_path / "x.dcm", patient_id="John Smith")
