"""Result objects for a PACS, built with highdicom: the MR DICOM SEG and its TID 1500 measurement report (or, where
the model found no tumour, a TID 1500 report saying so), the CT Grad-CAM overlay as an RGB Secondary Capture and its
class-probability report. The maps are in `parametric_maps`, the sets a PACS rule asks for in `result_sets`.

Every object names the model and its exact version (Manufacturer `OUR_MANUFACTURER`, ManufacturerModelName = model
id, SoftwareVersions = model tag, and a Contributing Equipment item saying the same) and, while the model card says
demo, has a SeriesDescription starting "NOT FOR DIAGNOSIS". Each object opens a new series in the source's study.
Patient and study attributes come from the source's de-identified header (`study_reference`): PatientID and the
study's UIDs and dates, never names or birth dates. (The SEG the MRI route returns: `postprocessing.deidentification`.)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from core.cards.classification import ClassificationCard
from core.cards.segmentation import ENHANCING, NECROTIC_CORE, OEDEMA, SegmentationCard
from core.schemas import LabelStatistics
from core.volumes import SeriesSource
from postprocessing.measurements import MM3_PER_ML
from preprocessing.dicom_series import deidentified_header

OUR_MANUFACTURER = "NeuroNova Inference"
"""The Manufacturer of every object we write: how our own result series are recognised (`pacs.selection`)."""
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSIS"
SEG_SERIES_NUMBER, MR_REPORT_SERIES_NUMBER, CT_OVERLAY_SERIES_NUMBER, CT_REPORT_SERIES_NUMBER = 9901, 9902, 9903, 9904
MILLILITRE = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
CLASS_SCHEME = "99NEURONOVA"
"""Private coding scheme of the classifier's classes (the contract's class names, which no public scheme codes)."""
NO_TUMOUR = (codes.SCT.Neoplasm, codes.SCT.Absent)
"""The negative MR report's qualitative evaluation: "Neoplasm" (SCT 108369006) = "Absent" (SCT 272519000)."""
COMMENT = codes.DCM.Comment
"""Concept name (DCM 121106) of the TEXT items that carry the model's warnings in the negative MR report."""
_SEG_PROPERTY_TYPES = {NECROTIC_CORE: codes.SCT.Necrosis, OEDEMA: codes.SCT.Edema, ENHANCING: codes.SCT.Neoplasm}
_DEMO = re.compile(r"\bdemo\b|not for clinical use", re.IGNORECASE)
_LO = 64
"""Longest DICOM LO (Long String) value."""
_PATIENT_AXES = (("L", "R"), ("P", "A"), ("H", "F"))
"""DICOM patient-orientation letters of the +/- x, y, z axes of the LPS patient system."""
_TYPE_2_PATIENT_STUDY = ("PatientID", "PatientSex", "StudyID", "StudyDate", "StudyTime")
"""Type-2 Patient and General Study attributes (beside those `deidentified_header` empties) highdicom copies."""

Card = SegmentationCard | ClassificationCard


@dataclass(frozen=True)
class ModelIdentity:
    """Which model made a result, as every result object states it; `demo` while the card's intended use says so."""

    model_id: str
    model_tag: str
    model_name: str
    demo: bool

    @classmethod
    def of(cls, card: Card, model_tag: str) -> ModelIdentity:
        return cls(model_id=card.task, model_tag=model_tag, model_name=card.name,
                   demo=_DEMO.search(card.intended_use) is not None)

    def series_description(self, what: str) -> str:
        """`what` (e.g. "tumour segmentation"), prefixed NOT FOR DIAGNOSIS for a demo model."""
        text = f"NeuroNova {what}"
        return (f"{NOT_FOR_DIAGNOSIS} - {text}" if self.demo else text)[:_LO]

    def algorithm(self) -> hd.AlgorithmIdentificationSequence:
        """The SEG's algorithm identification: the model's name and exact version."""
        return hd.AlgorithmIdentificationSequence(name=self.model_name[:_LO], version=self.model_tag[:_LO],
                                                  family=codes.cid7162.ArtificialIntelligence)

    def sr_algorithm(self) -> hd.sr.AlgorithmIdentification:
        """The same for a measurement report (TID 4019)."""
        return hd.sr.AlgorithmIdentification(name=self.model_name[:_LO], version=self.model_tag[:_LO],
                                             family=codes.cid7162.ArtificialIntelligence,
                                             manufacturer=OUR_MANUFACTURER)

    def equipment(self, what: str) -> dict[str, Any]:
        """Keyword arguments for any highdicom SOP class: our equipment, the model as model name and software
        version, a Contributing Equipment item saying the same, and the series description."""
        return {
            "manufacturer": OUR_MANUFACTURER, "manufacturer_model_name": self.model_id,
            "software_versions": self.model_tag[:_LO], "device_serial_number": "0",
            "series_description": self.series_description(what),
            "contributing_equipment": [hd.ContributingEquipment(
                manufacturer=OUR_MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
                manufacturer_model_name=self.model_id, software_versions=self.model_tag[:_LO],
                contribution_description=(f"{self.model_name} {self.model_tag}"
                                          + (f" ({NOT_FOR_DIAGNOSIS})" if self.demo else ""))[:1024],
            )],
        }

    def observation_context(self) -> hd.sr.ObservationContext:
        """The report's observer: the model as a device, with a UID that is the same for every report of one
        model version."""
        return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=generate_uid(entropy_srcs=[self.model_id, self.model_tag]),
                name=self.model_tag[:_LO], manufacturer_name=OUR_MANUFACTURER, model_name=self.model_id,
            ),
        ))


def study_reference(source: Dataset) -> Dataset:
    """The source's header as the result objects copy it: de-identified (no pixel data, names, birth date or
    private tags), with every type-2 patient and study attribute present (empty when the source lacks it)."""
    reference = deidentified_header(source)
    for keyword in _TYPE_2_PATIENT_STUDY:
        if keyword not in reference:
            setattr(reference, keyword, "")
    return reference


def result_uid(uid_key: str | None, *parts: str) -> str:
    """A new UID; with `uid_key` (e.g. a PACS job's idempotency key) the same UID for the same key and parts, so a
    job done again writes the same instances again (the PACS keeps one of each) rather than a second result set."""
    return hd.UID() if uid_key is None else generate_uid(entropy_srcs=[uid_key, *parts])


def dataset_bytes(dataset: Dataset) -> bytes:
    """A result object as a DICOM Part 10 file (what STOW-RS and C-STORE send)."""
    buffer = DicomBytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def mr_segmentation(labels: np.ndarray, source: SeriesSource, card: SegmentationCard, model_tag: str, *,
                    uid_key: str | None = None, reference: Callable[[Dataset], Dataset] = study_reference
                    ) -> hd.seg.Segmentation:
    """A BINARY DICOM SEG of the tumour labels present, on and referencing the source series.

    `labels` is on the series' own grid: x = column, y = row, z = the series' slices in `source.headers` order.
    Patient and study attributes come from `reference` of each header: `study_reference` (the study's identity, for
    the PACS), or the API's profile (`postprocessing.deidentification`). Segment labels are the card's label names.
    `uid_key`: see `result_uid`.
    """
    identity = ModelIdentity.of(card, model_tag)
    present = [label for label in card.tumor_labels() if np.any(labels == label.value)]
    segment_of_value = np.zeros(256, dtype=np.uint8)
    for number, label in enumerate(present, start=1):
        segment_of_value[label.value] = number
    frames = np.ascontiguousarray(np.transpose(segment_of_value[labels], (2, 1, 0)))
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=label.name,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=_SEG_PROPERTY_TYPES[label.name],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=identity.algorithm(),
        )
        for number, label in enumerate(present, start=1)
    ]
    return hd.seg.Segmentation(
        source_images=[reference(header) for header in source.headers], pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=result_uid(uid_key, "seg", "series"), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=result_uid(uid_key, "seg", "instance"), instance_number=1,
        **identity.equipment("tumour segmentation"),
    )


def mr_measurement_report(segmentation: hd.seg.Segmentation, source_images: list[Dataset],
                          volumes_ml: dict[str, float], card: SegmentationCard, model_tag: str, *,
                          uid_key: str | None = None) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 measurement report: per SEG segment, its volume in mL, referencing the segment.

    `volumes_ml` maps each segment label (the card's label names) to its volume as the pipeline measured it,
    i.e. voxel count x voxel volume (`segment_volumes_ml`); it must name exactly the SEG's segments.
    `source_images` are the source series' instances (headers suffice) the SEG references. `uid_key`: see
    `result_uid`.
    """
    identity = ModelIdentity.of(card, model_tag)
    segments = {item.SegmentLabel: item for item in segmentation.SegmentSequence}
    if set(volumes_ml) != set(segments):
        raise ValueError(f"volumes name {sorted(volumes_ml)}, the SEG's segments are {sorted(segments)}")
    groups = [
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=result_uid(uid_key, "mr-report", label),
                                                         identifier=label),
            referenced_segment=hd.sr.ReferencedSegment.from_segmentation(segmentation, item.SegmentNumber),
            finding_category=hd.sr.CodedConcept.from_dataset(item.SegmentedPropertyCategoryCodeSequence[0]),
            finding_type=hd.sr.CodedConcept.from_dataset(item.SegmentedPropertyTypeCodeSequence[0]),
            finding_sites=[hd.sr.FindingSite(codes.SCT.Brain)], algorithm_id=identity.sr_algorithm(),
            measurements=[hd.sr.Measurement(
                name=codes.SCT.Volume, value=float(volumes_ml[label]), unit=MILLILITRE,
                method=codes.DCM.SumOfSegmentedVoxelMethodForVolume, algorithm_id=identity.sr_algorithm(),
            )],
        )
        for label, item in segments.items()
    ]
    report = hd.sr.MeasurementReport(observation_context=identity.observation_context(),
                                     procedure_reported=codes.LN.BrainMRI, imaging_measurements=groups,
                                     title=codes.DCM.ImagingMeasurementReport)
    return hd.sr.Comprehensive3DSR(
        evidence=[segmentation, *source_images], content=report,
        series_instance_uid=result_uid(uid_key, "mr-report", "series"), series_number=MR_REPORT_SERIES_NUMBER,
        sop_instance_uid=result_uid(uid_key, "mr-report", "instance"), instance_number=1, is_complete=True,
        **identity.equipment("tumour volumes"),
    )


def mr_negative_report(sources: Sequence[SeriesSource], warnings: Sequence[str], card: SegmentationCard,
                       model_tag: str, *, uid_key: str | None = None) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 report of an MR run that found no tumour, so that "no tumour found" differs from "not processed".

    One measurement group (TID 1501): finding type "Neoplasm" (SCT 108369006) at the brain, with the qualitative
    evaluation `NO_TUMOUR` ("Neoplasm" = "Absent", SCT 272519000), and each of the run's `warnings` (out of
    distribution, sequences zero-filled, ...) as a TEXT qualitative evaluation (TID 1501 row 12) named `COMMENT`: a
    negative the model doubts says so.
    Its source images and the report's evidence are every instance of `sources`, the DICOM series the model read.
    No SEG: there is no segment. `uid_key`: see `result_uid`.
    """
    headers = [study_reference(header) for source in sources for header in source.headers]
    if not headers:
        raise ValueError("a negative report needs the DICOM series the model read")
    identity = ModelIdentity.of(card, model_tag)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=result_uid(uid_key, "mr-negative", "finding"),
                                                     identifier="no tumour detected"),
        finding_type=codes.SCT.Neoplasm, finding_sites=[hd.sr.FindingSite(codes.SCT.Brain)],
        algorithm_id=identity.sr_algorithm(), qualitative_evaluations=[hd.sr.QualitativeEvaluation(*NO_TUMOUR)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(h) for h in headers],
    )
    group[0].ContentSequence.extend(
        hd.sr.TextContentItem(name=COMMENT, value=warning, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        for warning in warnings
    )
    report = hd.sr.MeasurementReport(observation_context=identity.observation_context(),
                                     procedure_reported=codes.LN.BrainMRI, imaging_measurements=[group],
                                     title=codes.DCM.ImagingMeasurementReport)
    return hd.sr.Comprehensive3DSR(
        evidence=headers, content=report,
        series_instance_uid=result_uid(uid_key, "mr-negative", "series"), series_number=MR_REPORT_SERIES_NUMBER,
        sop_instance_uid=result_uid(uid_key, "mr-negative", "instance"), instance_number=1, is_complete=True,
        **identity.equipment("no tumour detected"),
    )


def ct_overlay_capture(source: Dataset, overlay_rgb: np.ndarray, card: ClassificationCard, model_tag: str, *,
                       method: str = "Grad-CAM", finding: str | None = None, uid_key: str | None = None
                       ) -> hd.sc.SCImage:
    """The heatmap overlay (`method`'s, e.g. Grad-CAM) as a Secondary Capture in the source's study, in a new series.

    `overlay_rgb` is uint8 rows x columns x 3 as the CT route draws it (`pipelines.shaping.heatmap_explanation`):
    `xai.render.overlay(prepared.display, to_source_geometry(heatmap, prepared.display.shape))`. The source's pixel
    spacing and orientation are kept when the overlay has the source's size. `finding` (e.g. "Glioma 61%") goes
    into the SeriesDescription, which viewers list even where they ignore SR. `uid_key`: see `result_uid`.
    """
    if overlay_rgb.dtype != np.uint8 or overlay_rgb.ndim != 3 or overlay_rgb.shape[2] != 3:
        raise ValueError(f"the overlay must be uint8 rows x columns x 3, not {overlay_rgb.dtype} {overlay_rgb.shape}")
    identity = ModelIdentity.of(card, model_tag)
    same_grid = overlay_rgb.shape[:2] == (source.get("Rows"), source.get("Columns"))
    spacing = source.get("PixelSpacing") if same_grid else None
    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=study_reference(source), pixel_array=np.ascontiguousarray(overlay_rgb),
        photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
        series_instance_uid=result_uid(uid_key, "ct-overlay", "series"), series_number=CT_OVERLAY_SERIES_NUMBER,
        sop_instance_uid=result_uid(uid_key, "ct-overlay", "instance"), instance_number=1,
        pixel_spacing=tuple(float(v) for v in spacing) if spacing else None,
        patient_orientation=patient_orientation(source.get("ImageOrientationPatient") if same_grid else None),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        **identity.equipment(f"{method} {finding or 'overlay'}"),
    )
    # General Series Laterality (type 2C): the source's, else present and empty (unknown). highdicom takes only L/R,
    # and dciodvfy counts an absent one as an error where it cannot tell whether the body part is paired.
    capture.Laterality = source.get("Laterality", "")
    capture.SourceImageSequence = [source_image_reference(source)]
    capture.DerivationDescription = f"{method} heatmap over the source image"
    return capture


def source_image_reference(source: Dataset) -> Dataset:
    """A Source Image Sequence item naming `source` as the image this object was computed from."""
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(
        codes.DCM.SourceImageForImageProcessingOperation)]
    return item


def patient_orientation(cosines: Sequence[float] | None) -> tuple[str, str]:
    """PatientOrientation letters of the row and column directions of an ImageOrientationPatient (the dominant axis
    of each); an axial image's ("L", "P") when the orientation is unknown."""
    if cosines is None or len(cosines) != 6:
        return ("L", "P")
    letters = []
    for direction in (np.asarray(cosines[:3], float), np.asarray(cosines[3:], float)):
        axis = int(np.argmax(np.abs(direction)))
        letters.append(_PATIENT_AXES[axis][0 if direction[axis] >= 0 else 1])
    return letters[0], letters[1]


def ct_probability_report(source: Dataset, probabilities: dict[str, float], predicted: str,
                          card: ClassificationCard, model_tag: str, *, uid_key: str | None = None
                          ) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 report on the source slice: one measurement group per class (finding type = the class, one
    Probability measurement), the predicted class's group also holding it as Classification; the probabilities
    must sum to 1. `uid_key`: see `result_uid`."""
    if predicted not in probabilities:
        raise ValueError(f"predicted class {predicted!r} is not among {sorted(probabilities)}")
    if not np.isclose(sum(probabilities.values()), 1.0, atol=1e-4):
        raise ValueError(f"probabilities sum to {sum(probabilities.values()):.6f}, not 1")
    identity = ModelIdentity.of(card, model_tag)
    image = hd.sr.SourceImageForMeasurementGroup.from_source_image(source)
    groups = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=result_uid(uid_key, "ct-report", name),
                                                         identifier=name),
            finding_type=class_concept(name), finding_sites=[hd.sr.FindingSite(codes.SCT.Brain)],
            algorithm_id=identity.sr_algorithm(), source_images=[image],
            measurements=[hd.sr.Measurement(name=codes.DCM.Probability, value=float(probability),
                                            unit=codes.UCUM.NoUnits, algorithm_id=identity.sr_algorithm())],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.SCT.Classification, class_concept(name))]
            if name == predicted else None,
        )
        for name, probability in probabilities.items()
    ]
    report = hd.sr.MeasurementReport(observation_context=identity.observation_context(),
                                     procedure_reported=codes.LN.HeadCT, imaging_measurements=groups,
                                     title=codes.DCM.ImagingMeasurementReport)
    return hd.sr.Comprehensive3DSR(
        evidence=[study_reference(source)], content=report,
        series_instance_uid=result_uid(uid_key, "ct-report", "series"), series_number=CT_REPORT_SERIES_NUMBER,
        sop_instance_uid=result_uid(uid_key, "ct-report", "instance"), instance_number=1, is_complete=True,
        coding_schemes=[CodingSchemeIdentificationItem(designator=CLASS_SCHEME, name="NeuroNova Inference classes")],
        **identity.equipment("class probabilities"),
    )


def class_concept(name: str) -> hd.sr.CodedConcept:
    """A contract class (e.g. "No Tumor") as a code of `CLASS_SCHEME`."""
    return hd.sr.CodedConcept(re.sub(r"[^A-Z0-9]+", "_", name.upper())[:16], CLASS_SCHEME, name)


def segment_volumes_ml(statistics: Sequence[LabelStatistics]) -> dict[str, float]:
    """Each present label's volume in mL as `postprocessing.measurements.label_statistics` measured it (voxel count
    x voxel volume; from its mm³, which keeps more digits than its mL): what `mr_measurement_report` takes."""
    return {s.label: s.volume_mm3 / MM3_PER_ML for s in statistics if s.voxel_count}


def read_volumes_ml(report: Dataset) -> dict[str, float]:
    """Segment label -> volume (mL) of a report `mr_measurement_report` wrote (each group's tracking identifier is
    the label of the segment it references)."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(report)
    return {group.tracking_identifier: float(group.get_measurements(name=codes.SCT.Volume)[0].value)
            for group in sr.content.get_volumetric_roi_measurement_groups()}


def read_probabilities(report: Dataset) -> tuple[dict[str, float], str | None]:
    """Class -> probability, and the predicted class, of a report `ct_probability_report` wrote."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(report)
    probabilities, predicted = {}, None
    for group in sr.content.get_image_measurement_groups():
        name = group.finding_type.meaning
        probabilities[name] = float(group.get_measurements(name=codes.DCM.Probability)[0].value)
        if group.get_qualitative_evaluations(name=codes.SCT.Classification):
            predicted = name
    return probabilities, predicted


@dataclass(frozen=True)
class TumourFinding:
    """What a report `mr_negative_report` wrote says: the "Neoplasm" evaluation (e.g. Absent) and the model's
    warnings, in report order."""

    neoplasm: hd.sr.CodedConcept
    warnings: tuple[str, ...]


def read_tumour_finding(report: Dataset) -> TumourFinding:
    """The finding and warnings of a report `mr_negative_report` wrote."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(report)
    [group] = sr.content.get_image_measurement_groups()
    [evaluation] = group.get_qualitative_evaluations(name=NO_TUMOUR[0])
    comments = [item.TextValue for item in group[0].ContentSequence
                if item.ValueType == "TEXT" and item.name == COMMENT]
    return TumourFinding(neoplasm=evaluation.value, warnings=tuple(comments))
