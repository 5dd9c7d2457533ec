"""Parametric Maps of the CT heatmap and the MR uncertainty: on their source's geometry and referencing it, the
values back through the Real World Value Mapping, the model named, dciodvfy-clean; and which objects a PACS rule
stores (`postprocessing.result_sets`)."""

from __future__ import annotations

import copy

import numpy as np
import pydantic
import pytest
from pydicom.dataset import Dataset

from pacs.selection import ModelRules
from postprocessing.parametric_maps import ct_heatmap_map, missing_geometry, mr_uncertainty_map
from postprocessing.result_sets import checked_objects, ct_results, mr_results
from tests.dicom_validation import assert_dciodvfy_clean
from tests.unit.postprocessing.test_dicom_results import (  # noqa: F401 - fixtures
    CT_CARD,
    CT_TAG,
    MR_CARD,
    MR_TAG,
    PROBABILITIES,
    assert_names_the_model,
    ct_heatmap,
    ct_source,
    mr_case,
    round_trip,
)

PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"


def real_world_values(parametric_map: Dataset) -> np.ndarray:
    """The map's values as a viewer shows them: stored values through the Real World Value Mapping."""
    mapping = parametric_map.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    stored = parametric_map.pixel_array.astype(np.float64)
    return stored * float(mapping.RealWorldValueSlope) + float(mapping.RealWorldValueIntercept)


def frame_sources(parametric_map: Dataset) -> list[str]:
    return [frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            for frame in parametric_map.PerFrameFunctionalGroupsSequence]


@pytest.fixture(scope="module")
def uncertainty(mr_case) -> np.ndarray:
    """A smooth uncertainty field on the source series' grid (x, y, z), highest at its centre."""
    _, labels, _ = mr_case
    grid = np.meshgrid(*(np.linspace(-1, 1, n) for n in labels.shape), indexing="ij")
    return np.clip(1.0 - np.sqrt(sum(axis ** 2 for axis in grid)) / np.sqrt(3), 0.0, 1.0).astype(np.float32)


def test_the_ct_heatmap_map_lies_on_its_source_with_the_heatmap_values(ct_source, ct_heatmap) -> None:
    _, heatmap = ct_heatmap
    pm = round_trip(ct_heatmap_map(ct_source, heatmap, CT_CARD, CT_TAG, method="Grad-CAM",
                                   explained_class="Glioma", uid_key="job-1"))

    assert pm.SOPClassUID == PARAMETRIC_MAP_STORAGE and pm.Modality == "OT" and pm.NumberOfFrames == 1
    assert_names_the_model(pm, "ct_classification", CT_TAG)
    assert pm.StudyInstanceUID == ct_source.StudyInstanceUID and pm.SeriesInstanceUID != ct_source.SeriesInstanceUID
    assert frame_sources(pm) == [ct_source.SOPInstanceUID]
    assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_source.SeriesInstanceUID
    assert pm.FrameOfReferenceUID == ct_source.FrameOfReferenceUID
    plane = pm.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    assert [float(v) for v in plane.ImagePositionPatient] == pytest.approx([float(v) for v in
                                                                           ct_source.ImagePositionPatient])
    measures = pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == pytest.approx([float(v) for v in ct_source.PixelSpacing])
    np.testing.assert_allclose(real_world_values(pm), heatmap, atol=1e-6)
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.LUTLabel == "Grad-CAM" and mapping.LUTExplanation == "Grad-CAM of Glioma, 0 to 1"
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    assert pm.ContentDescription == f"Grad-CAM of Glioma by {CT_TAG}"
    assert pm.SeriesDescription == "NOT FOR DIAGNOSIS - NeuroNova Grad-CAM of Glioma"
    assert pm.PatientID == ct_source.PatientID and pm.PatientName == ""
    assert_dciodvfy_clean(pm)


def test_the_mr_uncertainty_map_has_a_frame_on_each_source_slice(mr_case, uncertainty) -> None:
    source, _, _ = mr_case
    pm = round_trip(mr_uncertainty_map(uncertainty, source, MR_CARD, MR_TAG, uid_key="job-2"))

    assert pm.SOPClassUID == PARAMETRIC_MAP_STORAGE and pm.NumberOfFrames == len(source.headers)
    assert_names_the_model(pm, "mri_segmentation", MR_TAG)
    slice_of = {str(header.SOPInstanceUID): index for index, header in enumerate(source.headers)}
    slices = [slice_of[uid] for uid in frame_sources(pm)]
    assert sorted(slices) == list(range(len(source.headers)))
    normal = np.cross(*np.reshape(np.asarray(source.headers[0].ImageOrientationPatient, float), (2, 3)))
    distances = [float(np.dot(normal, np.asarray(source.headers[i].ImagePositionPatient, float))) for i in slices]
    assert distances == sorted(distances)  # the order OHIF lays the frames on the volume in
    values = real_world_values(pm)
    for frame, (index, groups) in enumerate(zip(slices, pm.PerFrameFunctionalGroupsSequence)):
        position = [float(v) for v in groups.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx([float(v) for v in source.headers[index].ImagePositionPatient])
        np.testing.assert_allclose(values[frame], uncertainty[:, :, index].T, atol=1e-6)
    assert pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].LUTLabel == "Uncertainty"
    assert_dciodvfy_clean(pm)


def test_a_map_needs_its_source_grid_and_geometry(ct_source, ct_heatmap) -> None:
    _, heatmap = ct_heatmap
    with pytest.raises(ValueError, match="on the source grid"):
        ct_heatmap_map(ct_source, heatmap[::2], CT_CARD, CT_TAG, method="Grad-CAM", explained_class="Glioma")
    flat = copy.deepcopy(ct_source)
    del flat.ImagePositionPatient
    assert missing_geometry(flat) == ["ImagePositionPatient"] and missing_geometry(ct_source) == []
    with pytest.raises(ValueError, match="no ImagePositionPatient"):
        ct_heatmap_map(flat, heatmap, CT_CARD, CT_TAG, method="Grad-CAM", explained_class="Glioma")


def test_a_rule_chooses_the_objects_stored_in_store_order(ct_source, ct_heatmap, mr_case, uncertainty) -> None:
    only_map = ct_results(ct_source, *ct_heatmap, "occlusion", PROBABILITIES, "Glioma", CT_CARD, CT_TAG,
                          objects=["probability_report", "heatmap_map"]).objects
    assert [ds.SOPClassUID for ds in only_map] == [PARAMETRIC_MAP_STORAGE, "1.2.840.10008.5.1.4.1.1.88.34"]
    assert only_map[0].SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].LUTLabel == "Occlusion"

    source, labels, volumes_ml = mr_case
    full = mr_results(labels, source, volumes_ml, MR_CARD, MR_TAG, uncertainty=uncertainty,
                      objects=["uncertainty_map", "measurement_report", "segmentation"]).objects
    assert [ds.Modality for ds in full] == ["SEG", "SR", "OT"]
    assert [ds.Modality for ds in mr_results(labels, source, volumes_ml, MR_CARD, MR_TAG,
                                             uncertainty=uncertainty).objects] == ["SEG", "SR"]
    without_passes = mr_results(labels, source, volumes_ml, MR_CARD, MR_TAG, objects=["uncertainty_map"]).objects
    assert without_passes == ()  # the run made no uncertainty: nothing to map


@pytest.mark.parametrize("model_id, objects, message", [
    ("ct_classification", ["segmentation"], "not segmentation"),
    ("mri_segmentation", ["measurement_report"], "references the segmentation"),
    ("mri_segmentation", [], "at least one"),
])
def test_a_rule_naming_impossible_objects_is_refused(model_id: str, objects: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        checked_objects(model_id, objects)
    with pytest.raises(pydantic.ValidationError, match=message):
        ModelRules(model_id=model_id, series={"slice": {"modality": "CT"}}, results=objects)


def test_a_rule_without_results_stores_the_model_default() -> None:
    ct = ModelRules(model_id="ct_classification", series={"slice": {"modality": "CT"}})
    mr = ModelRules(model_id="mri_segmentation", series={"T1": {"modality": "MR"}},
                    results=["uncertainty_map", "segmentation"])
    assert ct.result_objects == ("overlay_capture", "heatmap_map", "probability_report")
    assert mr.result_objects == ("segmentation", "uncertainty_map")
