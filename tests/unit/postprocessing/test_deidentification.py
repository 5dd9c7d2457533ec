"""The DICOM SEG the API returns is de-identified (DICOM PS3.15 Basic Profile, Retain UIDs): built from a series whose
headers carry identifying values everywhere, none of them is in its bytes, its PatientID is the request's pseudonym,
it still references the source series, instances and frame of reference, and it passes dciodvfy. The PACS's results
keep the study's identity."""

from __future__ import annotations

import io

import highdicom as hd
import pydicom
import pytest

from core.settings import DeidentificationSettings, Settings
from core.volumes import SeriesSource
from postprocessing.deidentification import Deidentification
from postprocessing.dicom_results import mr_segmentation, segment_volumes_ml
from postprocessing.measurements import label_statistics
from postprocessing.outputs import dicom_seg
from postprocessing.result_sets import mr_results
from preprocessing.volumes import decode_upload
from tests.dicom_validation import assert_dciodvfy_clean
from tests.unit.mri.mri_inputs import LIMITS, PHI, card, case_dicom_files, phi_values, small_case, with_phi

CARD = card()
TAG = "neuronova-mri:deid0001"
PSEUDONYM = "P000777"


@pytest.fixture(scope="module")
def phi_case():
    """A synthetic FLAIR series whose every header carries `PHI`, as the raw files and as the MRI route decodes it."""
    case = small_case()
    files = with_phi(case_dicom_files(case, sequences=("FLAIR",))["FLAIR"])
    volume = decode_upload([(None, f) for f in files], CARD.input, LIMITS)
    return case.labels, files, volume.source_of("FLAIR"), volume.affine


def raw_source(files: list[bytes], decoded: SeriesSource) -> SeriesSource:
    """The same series with the files' own headers (no hand-written stripping first): the profile alone."""
    headers = {h.SOPInstanceUID: h for h in (pydicom.dcmread(io.BytesIO(f)) for f in files)}
    return SeriesSource(sequence="FLAIR", format="dicom", series_uid=decoded.series_uid,
                        headers=tuple(headers[h.SOPInstanceUID] for h in decoded.headers))


def leaked(data: bytes) -> list[str]:
    return [value for value in phi_values() if value.encode() in data]


@pytest.mark.parametrize("headers", ["decoded", "raw"])
def test_the_api_seg_carries_no_source_phi_and_still_references_the_series(phi_case, headers) -> None:
    labels, files, decoded, _ = phi_case
    source = decoded if headers == "decoded" else raw_source(files, decoded)
    data = dicom_seg(labels, source, CARD, TAG, patient_id=PSEUDONYM)
    assert leaked(data) == []
    seg = pydicom.dcmread(io.BytesIO(data))
    assert seg.PatientID == PSEUDONYM and seg.PatientName == "" and seg.PatientBirthDate == ""
    assert seg.PatientSex == "" and seg.StudyDate == "" and seg.StudyTime == "" and seg.StudyID == ""
    assert "PatientAge" not in seg and "PatientWeight" not in seg and "StudyDescription" not in seg
    assert seg.PatientIdentityRemoved == "YES"
    assert [item.CodeValue for item in seg.DeidentificationMethodCodeSequence] == ["113100", "113110"]
    first = source.headers[0]
    assert seg.StudyInstanceUID == first.StudyInstanceUID and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    [series] = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == decoded.series_uid
    assert {i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence} == \
        {h.SOPInstanceUID for h in decoded.headers}
    read = hd.seg.Segmentation.from_dataset(seg)  # a viewer finds each frame's source instance
    pixels = read.get_pixels_by_source_instance([h.SOPInstanceUID for h in decoded.headers], segment_numbers=[1])
    assert pixels.shape[0] == len(decoded.headers)
    assert_dciodvfy_clean(seg)


def test_the_sources_are_left_as_they_are_and_the_pacs_results_keep_the_study_identity(phi_case) -> None:
    labels, files, decoded, affine = phi_case
    source = raw_source(files, decoded)
    dicom_seg(labels, source, CARD, TAG, patient_id=PSEUDONYM)
    assert source.headers[0].PatientName == PHI["PatientName"] and source.headers[0].StudyDate == PHI["StudyDate"]
    volumes = segment_volumes_ml(label_statistics(labels, affine, CARD))
    seg, report = mr_results(labels, decoded, volumes, CARD, TAG, uid_key="job-1").objects
    for result in (seg, report):  # filed into the study: its PatientID and date, as before
        assert result.PatientID == PHI["PatientID"] and result.StudyDate == PHI["StudyDate"]
        assert "PatientIdentityRemoved" not in result


def test_retain_dates_keeps_the_study_date_and_says_so(phi_case) -> None:
    labels, files, decoded, _ = phi_case
    profile = Deidentification(patient_id=PSEUDONYM, retain_dates=True)
    seg = mr_segmentation(labels, raw_source(files, decoded), CARD, TAG, reference=profile.reference)
    assert seg.StudyDate == PHI["StudyDate"] and seg.StudyTime == PHI["StudyTime"]
    assert seg.PatientBirthDate == "" and "PatientBirthTime" not in seg  # the patient's own: not under the option
    assert [item.CodeValue for item in seg.DeidentificationMethodCodeSequence] == ["113100", "113110", "113106"]
    data = pydicom.filebase.DicomBytesIO()
    seg.save_as(data, enforce_file_format=True)
    kept = {PHI[k] for k in ("StudyDate", "StudyTime", "AcquisitionDateTime", "AcquisitionDate")}  # the latter two:
    assert {PHI["StudyDate"], PHI["StudyTime"]} <= set(leaked(data.getvalue())) <= kept  # the scanner's contribution
    assert_dciodvfy_clean(seg)


def test_without_a_pseudonym_the_patient_id_is_empty_and_the_option_is_a_setting(phi_case, monkeypatch) -> None:
    labels, _, decoded, _ = phi_case
    seg = pydicom.dcmread(io.BytesIO(dicom_seg(labels, decoded, CARD, TAG)))
    assert seg.PatientID == ""
    assert Deidentification.of(DeidentificationSettings(), None) == Deidentification()
    assert not Settings().deidentification.retain_dates
    monkeypatch.setenv("NEURONOVA_DEIDENTIFICATION__RETAIN_DATES", "true")
    assert Deidentification.of(Settings().deidentification, "P1") == Deidentification("P1", retain_dates=True)
