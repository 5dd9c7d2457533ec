"""Masks, measurements and output files: hand-computed volumes, the mask overlays the input, SEG readable."""

from __future__ import annotations

import base64
import gzip
import io

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from postprocessing.masks import (
    PostProcessingOptions,
    clean_mask,
    labels_from_probabilities,
    remove_small_components,
    smooth_label_boundaries,
)
from postprocessing.measurements import label_statistics, location_and_box, tumor_volume
from postprocessing.outputs import (
    axial_axis,
    dicom_seg,
    display_plane,
    largest_tumour_slice,
    mask_nifti_gz,
    preview_png,
)
from preprocessing.volumes import decode_upload
from tests.unit.mri.mri_inputs import LIMITS, card, case_dicom_files, small_case

AFFINE = np.array([[0.0, 0.0, 2.5, -40.0], [-1.2, 0.0, 0.0, 60.0], [0.0, 1.5, 0.0, -10.0], [0.0, 0.0, 0.0, 1.0]])
CARD = card()


def blob_labels() -> np.ndarray:
    labels = np.zeros((20, 18, 16), np.uint8)
    labels[4:12, 5:13, 3:9] = 2
    labels[6:10, 7:11, 4:8] = 4
    labels[7:9, 8:10, 5:7] = 1
    labels[17, 1, 1] = 2  # a stray voxel
    return labels


def test_labels_from_probabilities_use_the_card_values() -> None:
    probabilities = np.zeros((4, 2, 1, 1), np.float32)
    probabilities[3, 0], probabilities[1, 1] = 0.9, 0.6
    np.testing.assert_array_equal(labels_from_probabilities(probabilities, CARD.channel_values())[:, 0, 0], [4, 1])


def test_small_components_are_removed_whole() -> None:
    labels = blob_labels()
    cleaned = remove_small_components(labels, 10)
    assert cleaned[17, 1, 1] == 0 and (cleaned[:12] == labels[:12]).all()
    assert remove_small_components(labels, 1) is labels
    assert remove_small_components(np.zeros((3, 3, 3), np.uint8), 10).sum() == 0


def test_smoothing_fills_a_pinhole_and_keeps_the_labels() -> None:
    labels = blob_labels()
    labels[8, 9, 6] = 0
    smoothed = smooth_label_boundaries(labels)
    assert smoothed[8, 9, 6] != 0 and set(np.unique(smoothed)) <= {0, 1, 2, 4}
    assert smooth_label_boundaries(np.zeros((4, 4, 4), np.uint8)).sum() == 0
    both = clean_mask(labels, PostProcessingOptions(smooth_boundaries=True, min_area_pixels=10))
    assert both[17, 1, 1] == 0
    assert clean_mask(labels, PostProcessingOptions(remove_small_objects=False)) is labels


def test_volumes_match_count_times_voxel_volume() -> None:
    labels = blob_labels()
    voxel_mm3 = 2.5 * 1.2 * 1.5
    statistics = {s.label: s for s in label_statistics(labels, AFFINE, CARD)}
    counts = {"necrotic_core": 2 * 2 * 2, "enhancing_tumor": 4 * 4 * 4 - 8, "oedema": 8 * 8 * 6 - 64 + 1}
    for name, count in counts.items():
        assert statistics[name].voxel_count == count
        assert statistics[name].volume_mm3 == pytest.approx(count * voxel_mm3)
        assert statistics[name].volume_ml == pytest.approx(count * voxel_mm3 / 1000, abs=1e-4)
    total = sum(counts.values())
    assert statistics["oedema"].fraction_of_tumor == pytest.approx(counts["oedema"] / total, abs=1e-4)
    volume = tumor_volume(list(statistics.values()), CARD)
    assert volume.total == pytest.approx(total * voxel_mm3 / 1000, abs=1e-3)
    assert volume.regions["TC"] == pytest.approx(64 * voxel_mm3 / 1000, abs=1e-3)
    assert volume.regions["ET"] == pytest.approx(56 * voxel_mm3 / 1000, abs=1e-3)
    assert volume.by_label["oedema"] == statistics["oedema"].volume_ml
    empty = label_statistics(np.zeros((3, 3, 3), np.uint8), AFFINE, CARD)
    assert all(s.voxel_count == 0 and s.fraction_of_tumor == 0.0 for s in empty)


def test_location_and_box_in_voxels_and_millimetres() -> None:
    labels = np.zeros((20, 18, 16), np.uint8)
    labels[4:8, 5:7, 3:4] = 2
    location, box = location_and_box(labels, AFFINE)
    assert (location.centroid_x, location.centroid_y, location.centroid_z) == (5.5, 5.5, 3.0)
    np.testing.assert_allclose(location.centroid_mm, (AFFINE @ [5.5, 5.5, 3.0, 1.0])[:3], atol=1e-3)
    assert (box.min_x, box.max_x, box.min_y, box.max_y, box.min_z, box.max_z) == (4, 7, 5, 6, 3, 3)
    corners = np.array([AFFINE @ [x, y, 3, 1] for x in (4, 7) for y in (5, 6)])[:, :3]
    np.testing.assert_allclose(box.min_mm, corners.min(0), atol=1e-3)
    np.testing.assert_allclose(box.max_mm, corners.max(0), atol=1e-3)
    assert location_and_box(np.zeros((2, 2, 2), np.uint8), AFFINE) is None


def test_mask_nifti_keeps_the_input_geometry() -> None:
    labels = blob_labels()
    image = nib.Nifti1Image.from_bytes(gzip.decompress(mask_nifti_gz(labels, AFFINE)))
    np.testing.assert_allclose(image.affine, AFFINE, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(image.dataobj), labels)
    assert image.get_data_dtype() == np.uint8 and int(image.header["sform_code"]) == 1


def test_preview_slice_is_axial_largest_and_radiological() -> None:
    assert axial_axis(AFFINE) == 1
    labels = blob_labels()
    image = np.random.default_rng(0).random(labels.shape).astype(np.float32)
    axial = largest_tumour_slice(image, labels, AFFINE)
    areas = [(labels[:, i, :] > 0).sum() for i in range(labels.shape[1])]
    assert axial.axis == 1 and areas[axial.index] == max(areas)
    ras = np.zeros((3, 4, 2))
    ras[2, 0, 0] = 1.0  # patient's most right (x high), most posterior (y low)
    plane = display_plane(ras, np.eye(4), 2, 0)
    assert plane.shape == (4, 3) and plane[3, 0] == 1.0  # bottom row (posterior), left column (patient's right)
    png = Image.open(io.BytesIO(base64.b64decode(preview_png(axial, CARD).split(",")[1])))
    assert png.size == (axial.image.shape[1], axial.image.shape[0]) and png.mode == "RGB"
    blank = largest_tumour_slice(image, np.zeros(labels.shape, np.uint8), AFFINE)
    assert blank.index == labels.shape[1] // 2
    assert preview_png(largest_tumour_slice(np.zeros(labels.shape, np.float32), labels, AFFINE), CARD).startswith("data:")


def test_dicom_seg_references_the_series_and_overlays_it() -> None:
    case = small_case()
    files = case_dicom_files(case, sequences=("FLAIR",))["FLAIR"]
    volume = decode_upload([(None, f) for f in files], CARD.input, LIMITS)
    source = volume.source_of("FLAIR")
    labels = case.labels
    seg = pydicom.dcmread(io.BytesIO(dicom_seg(labels, source, CARD, "neuronova-mri:test")))
    assert seg.Modality == "SEG" and seg.PatientName == ""
    assert seg.get("PatientBirthDate", "") == ""  # absent, or present and empty (type 2)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.series_uid
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["necrotic_core", "oedema", "enhancing_tumor"]
    read = hd.seg.Segmentation.from_dataset(seg)
    instances = [header.SOPInstanceUID for header in source.headers]
    pixels = read.get_pixels_by_source_instance(instances, segment_numbers=[1, 2, 3], combine_segments=True,
                                                relabel=False)
    segment_of_value = {0: 0, 1: 1, 2: 2, 4: 3}
    expected = np.vectorize(segment_of_value.get)(np.transpose(labels, (2, 1, 0)))
    np.testing.assert_array_equal(pixels, expected)
