"""The PACS round trip against a real Orthanc (issue #15's tests 1-8, and 9: a study without a tumour): studies
stored into Orthanc come back with their results in the same study, exactly once, through Lua notifications, a PACS
outage, a crash of the service and the `/changes` poller; a negative comes back as a report saying so. The tests run
in file order on one Orthanc and one served state directory (test 4's check comes after test 6, so that its 30 s wait
overlaps them)."""

from __future__ import annotations

import io
import os
import sqlite3
import time

import highdicom as hd
import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from postprocessing.dicom_results import read_tumour_finding
from tests.dicom_validation import assert_dciodvfy_clean
from tests.orthanc import Orthanc
from tests.pacs.conftest import (
    NOTIFY_TOKEN,
    OUR_MANUFACTURER,
    PATIENT_ID,
    PATIENT_NAME,
    PacsService,
    Study,
    ct_study,
    mr_study,
    notify_lua,
    ultrasound_study,
    wait_for,
)

pytestmark = [pytest.mark.pacs]
RESULTS_TIMEOUT_S = 120.0
_timings: dict[str, float] = {}
_studies: dict[str, Study] = {}
_jobs_before: dict[str, list[dict]] = {}


def our_series(orthanc: Orthanc, study_uid: str) -> list[dict]:
    return [s for s in orthanc.series_of_study(study_uid) if s["MainDicomTags"].get("Manufacturer") == OUR_MANUFACTURER]


def results(orthanc: Orthanc, study_uid: str, count: int) -> list[Dataset] | None:
    """Our result objects in the study once there are `count` series of them (each one instance), else None."""
    series = our_series(orthanc, study_uid)
    if len(series) < count:
        return None
    datasets = []
    for one in series:
        for instance in one["Instances"]:
            data = httpx.get(f"{orthanc.url}/instances/{instance}/file", timeout=10).content
            datasets.append(dcmread(io.BytesIO(data)))
    return datasets


def by_modality(datasets: list[Dataset]) -> dict[str, Dataset]:
    modalities = [str(ds.Modality) for ds in datasets]
    assert len(set(modalities)) == len(modalities), f"more than one result object per modality: {modalities}"
    return {str(ds.Modality): ds for ds in datasets}


def store_and_wait(orthanc: Orthanc, service: PacsService, study: Study, count: int) -> tuple[list[Dataset], float]:
    """Store the study into Orthanc; (our results, seconds from the last instance stored to the results' arrival)."""
    orthanc.upload(study.files)
    stored = time.monotonic()
    found = wait_for(lambda: results(orthanc, study.uid, count), RESULTS_TIMEOUT_S, f"{count} result series",
                     evidence=lambda: service.evidence(study.uid))
    return found, time.monotonic() - stored  # type: ignore[return-value]


def seg_volume_ml(seg: Dataset) -> float:
    """Voxels of every segment of a BINARY SEG times its voxel volume (pixel spacing x slice thickness), in mL."""
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    voxel_mm3 = float(measures.PixelSpacing[0]) * float(measures.PixelSpacing[1]) * float(measures.SliceThickness)
    return float(np.count_nonzero(seg.pixel_array)) * voxel_mm3 / 1000.0


def sr_volumes_ml(report: Dataset) -> list[float]:
    sr = hd.sr.Comprehensive3DSR.from_dataset(report)
    return [float(group.get_measurements(name=codes.SCT.Volume)[0].value)
            for group in sr.content.get_volumetric_roi_measurement_groups()]


def sr_probabilities(report: Dataset) -> dict[str, float]:
    sr = hd.sr.Comprehensive3DSR.from_dataset(report)
    return {group.finding_type.meaning: float(group.get_measurements(name=codes.DCM.Probability)[0].value)
            for group in sr.content.get_image_measurement_groups()}


def test_1_mr_study_comes_back_as_one_seg_and_one_report(orthanc: Orthanc, service: PacsService) -> None:
    study = _studies["mr"] = mr_study()
    load = os.getloadavg()[0]
    found, elapsed = store_and_wait(orthanc, service, study, 2)
    _timings["mr"] = elapsed
    print(f"MR study-in -> results-in-PACS: {elapsed:.1f} s (load average {load:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after)")
    objects = by_modality(found)
    assert set(objects) == {"SEG", "SR"}
    seg, report = objects["SEG"], objects["SR"]
    assert {str(ds.StudyInstanceUID) for ds in found} == {study.uid}
    assert {str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence} == {study.series["T1"]}
    assert seg.SegmentationType == "BINARY"
    assert sum(sr_volumes_ml(report)) == pytest.approx(seg_volume_ml(seg), rel=1e-3)
    (job,) = service.jobs(study.uid)
    assert job["state"] == "done" and job["model_id"] == "mri_segmentation" and job["series"] == study.series


def test_2_ct_study_comes_back_as_an_overlay_and_a_probability_report(orthanc: Orthanc, service: PacsService) -> None:
    study = _studies["ct"] = ct_study()
    found, elapsed = store_and_wait(orthanc, service, study, 2)
    _timings["ct"] = elapsed
    print(f"CT study-in -> results-in-PACS: {elapsed:.1f} s (load average {os.getloadavg()[0]:.2f})")
    objects = by_modality(found)
    assert set(objects) == {"OT", "SR"}
    capture = objects["OT"]
    assert capture.PhotometricInterpretation == "RGB" and capture.SamplesPerPixel == 3
    assert capture.pixel_array.shape[-1] == 3
    probabilities = sr_probabilities(objects["SR"])
    assert len(probabilities) == 4
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert {str(ds.StudyInstanceUID) for ds in found} == {study.uid}


def test_3_every_result_object_is_valid_dicom_naming_the_model_version(orthanc: Orthanc, service: PacsService) -> None:
    for name in ("mr", "ct"):
        study = _studies[name]
        (job,) = service.jobs(study.uid)
        for dataset in results(orthanc, study.uid, 2) or []:
            assert_dciodvfy_clean(dataset)
            what = f"{name} {dataset.Modality}"
            assert dataset.get("SoftwareVersions") == job["model_version"], what
            assert any(item.get("SoftwareVersions") == job["model_version"]
                       and job["model_version"] in item.ContributionDescription
                       for item in dataset.ContributingEquipmentSequence), what
            assert dataset.SeriesDescription.startswith("NOT FOR DIAGNOSIS"), what


def test_4_repeated_notifications_are_accepted(service: PacsService) -> None:
    """Notify the MR and CT studies twice more; test_4_..._30_s_later (after test 6) checks what came of it."""
    headers = {"Authorization": f"Bearer {NOTIFY_TOKEN}"}
    _jobs_before.update({name: service.jobs(study.uid) for name, study in _studies.items()})
    for study in (_studies["mr"], _studies["ct"]):
        for _ in range(2):
            answer = httpx.post(f"{service.url}/pacs/notify", json={"study_instance_uid": study.uid}, headers=headers,
                                timeout=30)
            assert answer.status_code == 202, answer.text
            assert answer.json() == {"study_instance_uid": study.uid, "queued": True}
    _timings["notified"] = time.monotonic()


def test_5_a_study_no_rule_matches_is_left_alone_and_logged(orthanc: Orthanc, service: PacsService) -> None:
    study = ultrasound_study()
    orthanc.upload(study.files)
    (job,) = wait_for(lambda: service.jobs(study.uid), 30, "the skipped job",
                      evidence=lambda: service.evidence(study.uid))  # type: ignore[misc]
    assert job["state"] == "skipped"
    assert job["reason"].startswith("no rule matched: ")
    assert "mri_segmentation: " in job["reason"] and "ct_classification: " in job["reason"]
    time.sleep(2)
    assert our_series(orthanc, study.uid) == []


def test_6_a_pacs_outage_before_export_delays_the_results_and_loses_nothing(
        orthanc: Orthanc, service: PacsService) -> None:
    study = mr_study(seed=4)
    orthanc.upload(study.files)
    retrieved = lambda: [j for j in service.jobs(study.uid)  # noqa: E731
                         if any(e["message"].startswith("retrieved") for e in j["log"])]
    (job,) = wait_for(retrieved, 60, "the job to retrieve its series", interval_s=0.05,
                      evidence=lambda: service.evidence(study.uid))  # type: ignore[misc]
    orthanc.stop()
    stopped = time.monotonic()
    wait_for(lambda: service.jobs(study.uid)[0]["export_failures"] >= 1, 60, "a failed export",
             evidence=lambda: service.evidence(study.uid))
    time.sleep(max(0.0, 20 - (time.monotonic() - stopped)))
    orthanc.start()
    found = wait_for(lambda: results(orthanc, study.uid, 2), 60, "the results after the restart",
                     evidence=lambda: service.evidence(study.uid))
    assert set(by_modality(found)) == {"SEG", "SR"}  # type: ignore[arg-type]
    (job,) = service.jobs(study.uid)
    assert job["state"] == "done" and job["runs"] == 1 and job["export_failures"] >= 1
    time.sleep(3)  # the restarted Orthanc's stable-study event for the results
    assert len(our_series(orthanc, study.uid)) == 2


def test_4_thirty_seconds_after_the_results_and_the_notifications_still_one_result_set(
        orthanc: Orthanc, service: PacsService) -> None:
    """Runs after tests 5 and 6 (which take longer than 30 s), so the 30 s pass meanwhile."""
    time.sleep(max(0.0, _timings["notified"] + 30 - time.monotonic()))
    for name, study in _studies.items():
        assert len(our_series(orthanc, study.uid)) == 2
        assert service.jobs(study.uid) == _jobs_before[name]  # the same one job, untouched
        assert [job["state"] for job in _jobs_before[name]] == ["done"]


def test_7_a_service_crash_mid_job_runs_the_job_again_once(orthanc: Orthanc, service: PacsService) -> None:
    study = _studies["crash"] = mr_study(seed=5)
    orthanc.upload(study.files)
    running = lambda: [j for j in service.jobs(study.uid) if j["state"] == "running"]  # noqa: E731
    wait_for(running, 60, "the job to run", interval_s=0.05, evidence=lambda: service.evidence(study.uid))
    service.crash()
    assert our_series(orthanc, study.uid) == []
    service.start(changes=True)  # from now on the /changes poller notifies (test 8), not Lua
    notify_lua(orthanc, None)
    found = wait_for(lambda: results(orthanc, study.uid, 2), RESULTS_TIMEOUT_S, "the results after the restart",
                     evidence=lambda: service.evidence(study.uid))
    assert set(by_modality(found)) == {"SEG", "SR"}  # type: ignore[arg-type]
    (job,) = service.jobs(study.uid)
    assert job["state"] == "done" and job["runs"] == 2
    assert any("interrupted by a restart" in entry["message"] for entry in job["log"])


def test_8_the_changes_poller_notifies_like_lua(orthanc: Orthanc, service: PacsService) -> None:
    study = ct_study()
    found, elapsed = store_and_wait(orthanc, service, study, 2)
    print(f"CT via /changes: {elapsed:.1f} s")
    assert set(by_modality(found)) == {"OT", "SR"}
    time.sleep(3)
    assert len(our_series(orthanc, study.uid)) == 2
    assert [job["state"] for job in service.jobs(study.uid)] == ["done"]


def test_9_an_mr_study_without_a_tumour_gets_a_report_saying_so(orthanc: Orthanc, service: PacsService) -> None:
    """Seed 6's healthy brain: the shipped demo model finds nothing in it (its highest tumour-class probability is
    0.39)."""
    study = mr_study(seed=6, tumour=False)
    found, elapsed = store_and_wait(orthanc, service, study, 1)
    print(f"MR study without a tumour -> negative report in PACS: {elapsed:.1f} s")
    (report,) = found
    assert report.Modality == "SR" and report.StudyInstanceUID == study.uid
    assert report.SeriesDescription == "NOT FOR DIAGNOSIS - NeuroNova no tumour detected"
    finding = read_tumour_finding(report)
    assert finding.neoplasm == codes.SCT.Absent
    assert not any("DICOM SEG" in warning for warning in finding.warnings)  # the report itself is the answer
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert {str(item.SeriesInstanceUID) for item in evidence} == set(study.series.values())
    assert_dciodvfy_clean(report)
    (job,) = service.jobs(study.uid)
    assert job["state"] == "done" and report.SoftwareVersions == job["model_version"]
    assert any(entry["message"] == "no tumour detected: negative report written" for entry in job["log"])
    time.sleep(3)
    assert len(our_series(orthanc, study.uid)) == 1


def test_no_patient_name_or_id_in_logs_or_job_state(service: PacsService) -> None:
    database = service.state / "data" / "pacs" / "jobs.sqlite3"
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT * FROM pacs_jobs").fetchall()
    assert rows
    texts = [repr(rows)] + [log.read_text(errors="replace") for log in service.logs]
    for text in texts:
        assert PATIENT_ID not in text and PATIENT_NAME not in text and PATIENT_NAME.split("^")[0] not in text
