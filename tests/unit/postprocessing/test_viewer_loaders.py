"""The result objects as the OHIF viewer loads them: its own loaders (dcmjs and @cornerstonejs/adapters, run in Node by
`tests.viewer_loaders`) read what our writers produce, next to the source images, and find the SEG's segments on
the slices and pixels we labelled, each report's measurements with their references to the SEG segment or source
image, the Parametric Maps' values on the source CT slice and MR slices, and the overlay capture's RGB pixels."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from core.ood import OOD_WARNING
from core.volumes import SeriesSource
from postprocessing.dicom_results import (
    ct_overlay_capture,
    ct_probability_report,
    dataset_bytes,
    mr_measurement_report,
    mr_negative_report,
    mr_segmentation,
    segment_volumes_ml,
)
from postprocessing.measurements import label_statistics
from postprocessing.parametric_maps import ct_heatmap_map, mr_uncertainty_map
from preprocessing.volumes import decode_upload
from tests import viewer_loaders
from tests.prerequisites import assert_skips_then_fails_under_ci
from tests.unit.mri.mri_inputs import LIMITS, case_dicom_files, small_case
from tests.unit.postprocessing.test_dicom_results import CT_CARD, CT_TAG, MR_CARD, MR_TAG, PROBABILITIES
from tests.viewer_loaders import ViewerLoadError, load_in_viewer, loaded, require_viewer
from xai.render import overlay

WARNINGS = [OOD_WARNING, "sequence T2 was not sent: the model ran with it zero-filled"]
CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
"""The CT source: one 128 x 128 slice with its plane geometry."""


@dataclass(frozen=True)
class MrCase:
    """A synthetic FLAIR series as files and as the MRI route decodes it, its tumour labels and volumes."""

    files: list[Path]
    source: SeriesSource
    labels: np.ndarray
    volumes_ml: dict[str, float]


@dataclass(frozen=True)
class Written:
    """Every result object, as a dataset and written to a file."""

    paths: dict[str, Path]
    datasets: dict[str, Dataset]

    def uid(self, name: str) -> str:
        return self.datasets[name].SOPInstanceUID


def write(folder: Path, name: str, dataset: Dataset) -> Path:
    path = folder / f"{name}.dcm"
    path.write_bytes(dataset_bytes(dataset))
    return path


@pytest.fixture(scope="module")
def mr_case(tmp_path_factory) -> MrCase:
    folder = tmp_path_factory.mktemp("flair")
    case = small_case()
    blobs = case_dicom_files(case, sequences=("FLAIR",))["FLAIR"]
    files = [folder / f"{index:03d}.dcm" for index in range(len(blobs))]
    for path, blob in zip(files, blobs):
        path.write_bytes(blob)
    volume = decode_upload([(None, blob) for blob in blobs], MR_CARD.input, LIMITS)
    volumes_ml = segment_volumes_ml(label_statistics(case.labels, volume.affine, MR_CARD))
    return MrCase(files, volume.source_of("FLAIR"), case.labels, volumes_ml)


@pytest.fixture(scope="module")
def ct_source() -> Dataset:
    return pydicom.dcmread(CT_SMALL)


@pytest.fixture(scope="module")
def heatmap(ct_source) -> np.ndarray:
    """A Grad-CAM-like map on the source grid: a ramp from 0 to 1 over a rectangle, 0 elsewhere."""
    values = np.zeros((ct_source.Rows, ct_source.Columns), np.float32)
    values[30:60, 40:80] = np.linspace(0.0, 1.0, 40, dtype=np.float32)
    return values


@pytest.fixture(scope="module")
def ct_overlay(ct_source, heatmap) -> np.ndarray:
    display = ct_source.pixel_array.astype(np.float32)
    return overlay((display - display.min()) / np.ptp(display), heatmap)


@pytest.fixture(scope="module")
def uncertainty(mr_case) -> np.ndarray:
    """Voxel uncertainty on the series' grid (x, y, z): high in the tumour, and a level of its own on each slice."""
    z_levels = np.linspace(0.05, 0.4, mr_case.labels.shape[2], dtype=np.float32)
    return np.where(mr_case.labels > 0, 0.9, z_levels[None, None, :]).astype(np.float32)


@pytest.fixture(scope="module")
def written(tmp_path_factory, mr_case, uncertainty, ct_source, heatmap, ct_overlay) -> Written:
    seg = mr_segmentation(mr_case.labels, mr_case.source, MR_CARD, MR_TAG)
    datasets = {
        "seg": seg,
        "mr_report": mr_measurement_report(seg, list(mr_case.source.headers), mr_case.volumes_ml, MR_CARD, MR_TAG),
        "negative_report": mr_negative_report([mr_case.source], WARNINGS, MR_CARD, MR_TAG),
        "capture": ct_overlay_capture(ct_source, ct_overlay, CT_CARD, CT_TAG, finding="Glioma 61%"),
        "ct_report": ct_probability_report(ct_source, PROBABILITIES, "Glioma", CT_CARD, CT_TAG),
        "heatmap_map": ct_heatmap_map(ct_source, heatmap, CT_CARD, CT_TAG, method="Grad-CAM",
                                      explained_class="Glioma"),
        "uncertainty_map": mr_uncertainty_map(uncertainty, mr_case.source, MR_CARD, MR_TAG),
    }
    folder = tmp_path_factory.mktemp("results")
    return Written({name: write(folder, name, dataset) for name, dataset in datasets.items()}, datasets)


@pytest.fixture(scope="module")
def viewer(written, mr_case) -> dict:
    """What the viewer's loaders extract from every result object, the source images beside them."""
    return load_in_viewer([*written.paths.values(), *mr_case.files, CT_SMALL])


def segment_numbers(seg: Dataset) -> dict[str, int]:
    return {item.SegmentLabel: item.SegmentNumber for item in seg.SegmentSequence}


def labelled_pixels(labels: np.ndarray, value: int, headers: tuple[Dataset, ...]) -> dict[str, list[int]]:
    """Per source instance (z), the row-major pixel indices (row = y, column = x) of voxels labelled `value`."""
    pixels = {header.SOPInstanceUID: np.flatnonzero(labels[:, :, z].T == value).tolist()
              for z, header in enumerate(headers)}
    return {uid: indices for uid, indices in pixels.items() if indices}


def test_the_seg_segments_land_on_the_source_pixels_we_labelled(viewer, written, mr_case) -> None:
    seg = loaded(viewer, written.uid("seg"))
    headers = mr_case.source.headers

    assert seg["referencedSeries"] == {"seriesInstanceUID": mr_case.source.series_uid,
                                       "instances": [h.SOPInstanceUID for h in headers]}
    assert [(s["number"], s["label"]) for s in seg["segments"]] == [(1, "necrotic_core"), (2, "oedema"),
                                                                    (3, "enhancing_tumor")]
    assert {(s["algorithmType"], s["algorithmName"], s["algorithmVersion"]) for s in seg["segments"]} == {
        ("AUTOMATIC", MR_CARD.name, MR_TAG)}
    assert not seg["overlappingSegments"]
    value_of = {label.name: label.value for label in MR_CARD.tumor_labels()}
    for segment in seg["segments"]:
        expected = labelled_pixels(mr_case.labels, value_of[segment["label"]], headers)
        assert segment["pixelsBySource"] == expected, segment["label"]
        assert (segment["frames"], segment["voxels"]) == (len(expected), sum(map(len, expected.values())))
        assert segment["voxels"] == int(np.sum(mr_case.labels == value_of[segment["label"]]))


def test_the_measurement_report_gives_each_segment_its_volume_and_reference(viewer, written, mr_case) -> None:
    report = loaded(viewer, written.uid("mr_report"))
    number_of = segment_numbers(written.datasets["seg"])

    assert report["template"] == "1500" and report["title"] == "Imaging Measurement Report"
    groups = {group["trackingIdentifier"]: group for group in report["groups"]}
    assert set(groups) == set(mr_case.volumes_ml)
    for label, group in groups.items():
        [volume] = group["measurements"]
        assert (volume["name"], volume["unit"], volume["unitScheme"]) == ("Volume", "ml", "UCUM")
        assert volume["value"] == pytest.approx(mr_case.volumes_ml[label], rel=1e-9)
        assert (group["algorithmName"], group["algorithmVersion"]) == (MR_CARD.name, MR_TAG)
        [segment] = [ref for ref in group["references"] if ref["name"] == "Referenced Segment"]
        assert (segment["sopInstanceUID"], segment["segmentNumbers"]) == (written.uid("seg"), [number_of[label]])
    shown = {m["TrackingIdentifier"]: m for m in report["ohif"]["measurements"]}
    assert {label: m["labels"] for label, m in shown.items()} == {
        label: [{"label": "Volume", "value": f"{volume:.2f} ml"}] for label, volume in mr_case.volumes_ml.items()}
    assert {m["TrackingUniqueIdentifier"] for m in shown.values()} == {
        g["trackingUniqueIdentifier"] for g in groups.values()}
    assert len(shown) == len(groups) == len({g["trackingUniqueIdentifier"] for g in groups.values()})


def test_the_negative_report_says_no_tumour_with_the_warnings_on_the_series_read(viewer, written, mr_case) -> None:
    report = loaded(viewer, written.uid("negative_report"))

    [group] = report["groups"]
    assert group["trackingIdentifier"] == "no tumour detected" and group["finding"] == "Neoplasm"
    assert {"name": "Neoplasm", "value": "Absent"} in group["evaluations"]
    assert [text["value"] for text in group["texts"] if text["name"] == "Comment"] == WARNINGS
    assert {ref["sopInstanceUID"] for ref in group["references"]} == {
        h.SOPInstanceUID for h in mr_case.source.headers}
    [shown] = report["ohif"]["measurements"]
    assert [label["label"] for label in shown["labels"]] == WARNINGS  # OHIF lists the comments


def test_the_ct_report_gives_each_class_its_probability_on_the_source_slice(viewer, written, ct_source) -> None:
    report = loaded(viewer, written.uid("ct_report"))

    groups = {group["trackingIdentifier"]: group for group in report["groups"]}
    assert {name: g["measurements"][0]["value"] for name, g in groups.items()} == pytest.approx(PROBABILITIES)
    assert {(m["name"], m["unit"], m["unitScheme"]) for g in groups.values() for m in g["measurements"]} == {
        ("Probability", "1", "UCUM")}
    for group in groups.values():
        assert [(ref["sopClassUID"], ref["sopInstanceUID"]) for ref in group["references"]] == [
            (ct_source.SOPClassUID, ct_source.SOPInstanceUID)]
    predicted = [name for name, g in groups.items()
                 if {"name": "Classification (attribute)", "value": name} in g["evaluations"]]
    assert predicted == ["Glioma"]
    assert {m["TrackingIdentifier"]: m["labels"] for m in report["ohif"]["measurements"]} == {
        name: [{"label": "Probability", "value": f"{p:.2f} 1"}] for name, p in PROBABILITIES.items()}


def test_the_overlay_capture_is_the_rgb_picture_we_drew(viewer, written, ct_overlay) -> None:
    capture = loaded(viewer, written.uid("capture"))

    pixel = capture["imagePixelModule"]
    assert (pixel["rows"], pixel["columns"], pixel["samplesPerPixel"]) == (*ct_overlay.shape[:2], 3)
    assert (pixel["photometricInterpretation"], pixel["bitsAllocated"], pixel["planarConfiguration"]) == (
        "RGB", 8, 0)
    assert capture["pixelSha256"] == hashlib.sha256(np.ascontiguousarray(ct_overlay).tobytes()).hexdigest()


def test_the_heatmap_map_holds_our_values_on_the_source_slice(viewer, written, ct_source, heatmap) -> None:
    shown = loaded(viewer, written.uid("heatmap_map"))

    assert shown["referencedSeries"] == {"seriesInstanceUID": ct_source.SeriesInstanceUID,
                                         "instances": [ct_source.SOPInstanceUID]}
    [frame] = shown["frames"]
    assert frame["source"] == ct_source.SOPInstanceUID
    assert (frame["mapping"]["lutLabel"], frame["mapping"]["unit"]) == ("Grad-CAM", "1")
    [image] = shown["volume"]
    assert image["sopInstanceUID"] == ct_source.SOPInstanceUID
    assert_shows(image, frame["mapping"], heatmap)
    assert shown["softwareVersions"] == CT_TAG


def test_the_uncertainty_map_shows_each_slices_values_on_that_slice(viewer, written, mr_case, uncertainty) -> None:
    shown = loaded(viewer, written.uid("uncertainty_map"))
    uids = [header.SOPInstanceUID for header in mr_case.source.headers]

    assert shown["referencedSeries"] == {"seriesInstanceUID": mr_case.source.series_uid, "instances": uids}
    assert sorted(frame["source"] for frame in shown["frames"]) == sorted(uids)  # each frame names its slice
    assert len(shown["volume"]) == len(uids)
    for image, frame in zip(shown["volume"], shown["frames"]):
        z = uids.index(image["sopInstanceUID"])
        assert_shows(image, frame["mapping"], uncertainty[:, :, z].T)  # rows = y, columns = x


def assert_shows(image: dict, mapping: dict, expected: np.ndarray) -> None:
    """The values the viewer shows on a source image are `expected`: after the Real World Value Mapping, and also
    as stored (OHIF ignores the mapping), up to its slope: the mapping must not shift them."""
    np.testing.assert_allclose(np.asarray(image["realWorld"]).reshape(expected.shape), expected, atol=5e-4)
    assert mapping["intercept"] == 0
    stored = np.asarray(image["stored"]).reshape(expected.shape)
    np.testing.assert_allclose(stored * mapping["slope"], expected, atol=5e-4)


def test_a_seg_without_its_referenced_series_fails_in_the_viewer(written, mr_case, tmp_path) -> None:
    broken = pydicom.dcmread(written.paths["seg"])
    del broken.ReferencedSeriesSequence
    broken.save_as(tmp_path / "broken.dcm")
    with pytest.raises(ViewerLoadError, match="ReferencedSeriesSequence is missing for the SEG"):
        load_in_viewer([tmp_path / "broken.dcm", *mr_case.files])


def test_without_node_the_viewer_tests_skip_but_fail_under_ci(monkeypatch) -> None:
    monkeypatch.setattr(viewer_loaders.shutil, "which", lambda name: None)
    assert_skips_then_fails_under_ci(monkeypatch, require_viewer, "apt-get install nodejs npm")
