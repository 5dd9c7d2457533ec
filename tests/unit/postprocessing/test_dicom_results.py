"""PACS result objects: each round-trips through pydicom, names the model version, is marked not for diagnosis for a
demo model and passes dciodvfy; the SR's volumes are the SEG's voxel count x voxel volume; CT probabilities sum to 1;
a negative MR report says no tumour, with the model's warnings, on the series the model read."""

from __future__ import annotations

import dataclasses
import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from core.cards.base import DEMO_INTENDED_USE, Provenance
from core.cards.classification import CT_CLASSES, ClassificationCard
from core.ood import OOD_WARNING
from pacs.selection import SeriesFacts, is_our_output
from postprocessing.dicom_results import (
    NOT_FOR_DIAGNOSIS,
    OUR_MANUFACTURER,
    class_concept,
    ct_overlay_capture,
    ct_probability_report,
    dataset_bytes,
    mr_measurement_report,
    mr_negative_report,
    patient_orientation,
    read_probabilities,
    read_tumour_finding,
    read_volumes_ml,
    segment_volumes_ml,
)
from postprocessing.measurements import label_statistics
from postprocessing.result_sets import ResultSet, ct_results, mr_results
from preprocessing.volumes import decode_upload
from tests import dicom_validation
from tests.dicom_validation import assert_dciodvfy_clean, require_dciodvfy
from tests.prerequisites import assert_skips_then_fails_under_ci
from tests.unit.mri.mri_inputs import LIMITS, card, case_dicom_files, small_case
from training_export.synthetic_ct import generate_ct_slice, write_ct_dicom
from xai.render import overlay, to_source_geometry

MR_TAG, CT_TAG = "neuronova-mri:mr5x7k2q", "neuronova-ct:ct3p9w1z"
MR_CARD = card()
CT_CARD = ClassificationCard(name="test classifier", intended_use=DEMO_INTENDED_USE, labels=list(CT_CLASSES),
                             provenance=Provenance(source="tests", synthetic_data=True))
PROBABILITIES = {"Glioma": 0.61, "Meningioma": 0.24, "Pituitary": 0.1, "No Tumor": 0.05}


def round_trip(dataset: Dataset) -> Dataset:
    return pydicom.dcmread(io.BytesIO(dataset_bytes(dataset)))


@pytest.fixture(scope="module")
def mr_case():
    """A synthetic FLAIR series decoded as the MRI route decodes it, its tumour labels and the pipeline's volumes."""
    case = small_case()
    files = case_dicom_files(case, sequences=("FLAIR",))["FLAIR"]
    volume = decode_upload([(None, f) for f in files], MR_CARD.input, LIMITS)
    statistics = label_statistics(case.labels, volume.affine, MR_CARD)
    volumes_ml = segment_volumes_ml(statistics)
    assert volumes_ml == pytest.approx({s.label: s.volume_ml for s in statistics if s.voxel_count}, abs=1e-4)
    return volume.source_of("FLAIR"), case.labels, volumes_ml


@pytest.fixture(scope="module")
def healthy_sources():
    """The T1 and FLAIR series of a synthetic brain without a tumour, decoded as the MRI route decodes them."""
    files = case_dicom_files(small_case(tumour=False), sequences=("T1", "FLAIR"))
    volume = decode_upload([(None, f) for series in files.values() for f in series], MR_CARD.input, LIMITS)
    return [source for source in volume.sources if source.headers]


@pytest.fixture(scope="module")
def mr_set(mr_case) -> ResultSet:
    source, labels, volumes_ml = mr_case
    return mr_results(labels, source, volumes_ml, MR_CARD, MR_TAG)


@pytest.fixture(scope="module")
def ct_source(tmp_path_factory) -> Dataset:
    path = tmp_path_factory.mktemp("ct") / "slice.dcm"
    write_ct_dicom(generate_ct_slice(np.random.default_rng(11), "Meningioma", size=96)[0], path)
    return pydicom.dcmread(path)


@pytest.fixture(scope="module")
def ct_heatmap(ct_source) -> tuple[np.ndarray, np.ndarray]:
    """The slice as the CT route shows it and a Grad-CAM map brought from model resolution to the source's grid."""
    display = ct_source.pixel_array.astype(np.float32) / ct_source.pixel_array.max()
    heatmap = np.zeros((7, 7), np.float32)
    heatmap[2:4, 3:5] = 1.0
    return display, to_source_geometry(heatmap, display.shape)


@pytest.fixture(scope="module")
def ct_overlay(ct_heatmap) -> np.ndarray:
    """The Grad-CAM overlay as the CT route draws it."""
    return overlay(*ct_heatmap)


def ct_set_of(ct_source, ct_heatmap, card: ClassificationCard = CT_CARD, **options) -> ResultSet:
    return ct_results(ct_source, *ct_heatmap, "grad_cam", PROBABILITIES, "Glioma", card, CT_TAG, **options)


@pytest.fixture(scope="module")
def ct_set(ct_source, ct_heatmap) -> ResultSet:
    return ct_set_of(ct_source, ct_heatmap)


def assert_names_the_model(dataset: Dataset, model_id: str, tag: str) -> None:
    assert dataset.Manufacturer == OUR_MANUFACTURER and dataset.ManufacturerModelName == model_id
    assert dataset.SoftwareVersions == tag
    processing = [item for item in dataset.ContributingEquipmentSequence
                  if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"]  # Processing Equipment
    ours = [(item.ManufacturerModelName, item.SoftwareVersions) for item in processing
            if item.Manufacturer == OUR_MANUFACTURER]
    assert ours == [(model_id, tag)]
    assert dataset.SeriesDescription.startswith(f"{NOT_FOR_DIAGNOSIS} - ")
    assert is_our_output(SeriesFacts.from_instance(dataset, 1))


def test_the_mr_seg_references_the_source_and_names_the_model(mr_case, mr_set) -> None:
    source, labels, _ = mr_case
    seg = round_trip(mr_set.objects[0])

    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert_names_the_model(seg, "mri_segmentation", MR_TAG)
    assert seg.StudyInstanceUID == source.headers[0].StudyInstanceUID
    assert seg.SeriesInstanceUID != source.series_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.series_uid
    algorithms = [item.SegmentationAlgorithmIdentificationSequence[0] for item in seg.SegmentSequence]
    assert {(a.AlgorithmName, a.AlgorithmVersion) for a in algorithms} == {(MR_CARD.name, MR_TAG)}
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["necrotic_core", "oedema", "enhancing_tumor"]
    assert mr_set.shown_without_sr == [mr_set.objects[0]]  # OHIF draws the SEG; the SR is for SR-aware viewers


def test_the_mr_report_gives_each_segment_its_voxel_count_times_voxel_volume(mr_case, mr_set) -> None:
    source, labels, volumes_ml = mr_case
    seg, sr = (round_trip(ds) for ds in mr_set.objects)

    assert sr.Modality == "SR" and sr.SOPClassUID == hd.sr.Comprehensive3DSR.from_dataset(sr).SOPClassUID
    assert sr.StudyInstanceUID == seg.StudyInstanceUID and sr.SeriesInstanceUID not in (seg.SeriesInstanceUID,
                                                                                         source.series_uid)
    assert_names_the_model(sr, "mri_segmentation", MR_TAG)
    read = read_volumes_ml(sr)
    assert read == pytest.approx(volumes_ml, rel=1e-9)

    segmentation = hd.seg.Segmentation.from_dataset(seg)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    voxel_ml = float(np.prod([float(v) for v in measures.PixelSpacing])) * float(measures.SpacingBetweenSlices) / 1000
    number_of = {item.SegmentLabel: item.SegmentNumber for item in seg.SegmentSequence}
    for label, volume in read.items():
        mask = segmentation.get_pixels_by_source_instance(
            [h.SOPInstanceUID for h in source.headers], segment_numbers=[number_of[label]])
        assert volume == pytest.approx(int(mask.sum()) * voxel_ml, rel=1e-3), label

    content = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    for group in content.get_volumetric_roi_measurement_groups():
        reference = group.roi if group.roi is not None else group.referenced_segment
        assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert reference.referenced_segment_numbers == [number_of[group.tracking_identifier]]
        [measurement] = group.get_measurements(name=pydicom.sr.codedict.codes.SCT.Volume)
        assert measurement.unit.value == "ml" and measurement.unit.scheme_designator == "UCUM"
        texts = {item.ConceptNameCodeSequence[0].CodeMeaning: item.get("TextValue")
                 for item in measurement[0].ContentSequence}
        assert (texts["Algorithm Name"], texts["Algorithm Version"]) == (MR_CARD.name, MR_TAG)


def test_the_mr_report_refuses_volumes_that_do_not_name_the_segments(mr_case, mr_set) -> None:
    source, _, volumes_ml = mr_case
    with pytest.raises(ValueError, match="segments"):
        mr_measurement_report(mr_set.objects[0], list(source.headers), {**volumes_ml, "WT": 9.0}, MR_CARD, MR_TAG)


def test_the_negative_mr_report_says_no_tumour_with_the_models_doubts_on_the_series_read(healthy_sources) -> None:
    warnings = [OOD_WARNING, "sequence T2 was not sent: the model ran with it zero-filled"]
    sr = round_trip(mr_negative_report(healthy_sources, warnings, MR_CARD, MR_TAG))

    assert sr.Modality == "SR" and sr.SOPClassUID == hd.sr.Comprehensive3DSR.from_dataset(sr).SOPClassUID
    assert_names_the_model(sr, "mri_segmentation", MR_TAG)
    assert sr.SeriesDescription == f"{NOT_FOR_DIAGNOSIS} - NeuroNova no tumour detected"  # seen without SR support
    assert sr.StudyInstanceUID == healthy_sources[0].headers[0].StudyInstanceUID and sr.PatientName == ""
    finding = read_tumour_finding(sr)
    assert finding.neoplasm == codes.SCT.Absent and finding.warnings == tuple(warnings)
    evidence = {item.SeriesInstanceUID: [ref.ReferencedSOPInstanceUID for ref in item.ReferencedSOPSequence]
                for item in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence}
    assert evidence == {s.series_uid: [h.SOPInstanceUID for h in s.headers] for s in healthy_sources}
    assert_dciodvfy_clean(sr)
    assert read_tumour_finding(round_trip(mr_negative_report(healthy_sources, [], MR_CARD, MR_TAG))).warnings == ()


def test_the_negative_mr_report_refuses_sources_without_dicom_series(healthy_sources) -> None:
    nifti = [dataclasses.replace(source, format="nifti", headers=()) for source in healthy_sources]
    with pytest.raises(ValueError, match="DICOM series"):
        mr_negative_report(nifti, [], MR_CARD, MR_TAG)


def test_the_ct_overlay_is_an_rgb_capture_in_the_source_study(ct_source, ct_overlay, ct_set) -> None:
    capture = round_trip(ct_set.objects[0])

    assert capture.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert capture.PhotometricInterpretation == "RGB"
    assert_names_the_model(capture, "ct_classification", CT_TAG)
    assert capture.StudyInstanceUID == ct_source.StudyInstanceUID
    assert capture.SeriesInstanceUID != ct_source.SeriesInstanceUID
    assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == ct_source.SOPInstanceUID
    assert capture.PatientID == ct_source.PatientID and capture.PatientName == ""
    np.testing.assert_array_equal(capture.pixel_array, ct_overlay)
    assert [float(v) for v in capture.PixelSpacing] == [float(v) for v in ct_source.PixelSpacing]
    assert list(capture.PatientOrientation) == ["L", "P"]
    assert capture.SeriesDescription == f"{NOT_FOR_DIAGNOSIS} - NeuroNova Grad-CAM Glioma 61%"  # seen without SR
    assert ct_set.shown_without_sr == list(ct_set.objects[:2])  # the capture and the heatmap's Parametric Map


def test_the_ct_report_gives_probabilities_that_sum_to_one(ct_source, ct_set) -> None:
    sr = round_trip(ct_set.objects[2])

    assert_names_the_model(sr, "ct_classification", CT_TAG)
    assert sr.StudyInstanceUID == ct_source.StudyInstanceUID
    probabilities, predicted = read_probabilities(sr)
    assert probabilities == pytest.approx(PROBABILITIES, abs=1e-9) and predicted == "Glioma"
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ct_source.SOPInstanceUID


@pytest.mark.parametrize("probabilities, predicted, message", [
    ({"Glioma": 0.6, "Meningioma": 0.3}, "Glioma", "sum to 0.9"),
    (PROBABILITIES, "Astrocytoma", "not among"),
])
def test_the_ct_report_refuses_inconsistent_probabilities(ct_source, probabilities, predicted, message) -> None:
    with pytest.raises(ValueError, match=message):
        ct_probability_report(ct_source, probabilities, predicted, CT_CARD, CT_TAG)


@pytest.mark.parametrize("kind, index", [("mr", 0), ("mr", 1), ("ct", 0), ("ct", 1), ("ct", 2)])
def test_every_result_object_passes_dciodvfy(request, kind: str, index: int) -> None:
    assert_dciodvfy_clean(round_trip(request.getfixturevalue(f"{kind}_set").objects[index]))


def test_dciodvfy_check_fails_on_an_object_with_errors(tmp_path) -> None:
    broken = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del broken.SOPInstanceUID
    broken.save_as(tmp_path / "broken.dcm")
    with pytest.raises(AssertionError, match="(?s)error.*SOPInstanceUID"):
        assert_dciodvfy_clean(tmp_path / "broken.dcm")
    assert_dciodvfy_clean(get_testdata_file("CT_small.dcm"))  # warnings only


def test_dciodvfy_check_fails_on_a_failing_exit_code_without_error_lines(monkeypatch) -> None:
    monkeypatch.setattr(dicom_validation, "dciodvfy_findings", lambda path, binary: (1, ["Warning - odd"]))
    with pytest.raises(AssertionError, match="exited 1"):
        assert_dciodvfy_clean(get_testdata_file("CT_small.dcm"))


def test_without_dciodvfy_the_check_skips_but_fails_under_ci(monkeypatch) -> None:
    monkeypatch.setattr(dicom_validation.shutil, "which", lambda name: None)
    assert_skips_then_fails_under_ci(monkeypatch, require_dciodvfy, "apt-get install dicom3tools")


def test_a_model_not_marked_demo_writes_no_warning_prefix(ct_source, ct_heatmap) -> None:
    clinical = CT_CARD.model_copy(update={"intended_use": "triage support, validated at site X"})
    capture, heatmap_map, report = ct_set_of(ct_source, ct_heatmap, clinical).objects
    assert capture.SeriesDescription == "NeuroNova Grad-CAM Glioma 61%"
    assert heatmap_map.SeriesDescription == "NeuroNova Grad-CAM of Glioma"
    assert report.SeriesDescription == "NeuroNova class probabilities"


def test_small_helpers() -> None:
    assert class_concept("No Tumor").value == "NO_TUMOR" and class_concept("No Tumor").meaning == "No Tumor"
    assert patient_orientation([0, 1, 0, 0, 0, -1]) == ("P", "F") and patient_orientation(None) == ("L", "P")


def test_a_uid_key_makes_a_redone_job_write_the_same_instances(mr_case, healthy_sources, ct_source,
                                                               ct_heatmap) -> None:
    source, labels, volumes_ml = mr_case

    def uids(key: str | None) -> list[tuple[str, str]]:
        mr = mr_results(labels, source, volumes_ml, MR_CARD, MR_TAG, uid_key=key).objects
        negative = mr_negative_report(healthy_sources, [], MR_CARD, MR_TAG, uid_key=key)
        ct = ct_set_of(ct_source, ct_heatmap, uid_key=key).objects
        return [(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in (*mr, negative, *ct)]

    once, again = uids("study-1/series-a/neuronova-mri:v1"), uids("study-1/series-a/neuronova-mri:v1")
    assert once == again and len({uid for pair in once for uid in pair}) == 12
    assert not set(once) & set(uids("study-1/series-a/neuronova-mri:v2"))
    assert not set(uids(None)) & set(uids(None))


def test_realistic_probabilities_and_overlays(ct_source, ct_overlay) -> None:
    logits = np.array([2.3, -0.4, 0.9, -1.7], np.float32)
    softmax = np.exp(logits) / np.exp(logits).sum()
    probabilities = dict(zip(CT_CLASSES, softmax.tolist()))
    report = round_trip(ct_probability_report(ct_source, probabilities, "Glioma", CT_CARD, CT_TAG))
    read, predicted = read_probabilities(report)
    assert read == pytest.approx(probabilities, abs=1e-9) and sum(read.values()) == pytest.approx(1.0, abs=1e-6)

    smaller = np.ascontiguousarray(ct_overlay[::2, ::2])
    capture = round_trip(ct_overlay_capture(ct_source, smaller, CT_CARD, CT_TAG))
    assert capture.pixel_array.shape == smaller.shape and "PixelSpacing" not in capture  # not the source's grid
    with pytest.raises(ValueError, match="uint8 rows x columns x 3"):
        ct_overlay_capture(ct_source, ct_overlay / 255.0, CT_CARD, CT_TAG)
