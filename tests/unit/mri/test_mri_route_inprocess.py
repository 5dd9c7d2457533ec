"""The MRI task route in-process (Starlette TestClient over NeuroNova's ASGI app, runners in the same process):
submit/status/get, the design's /task routes, NIfTI == DICOM series, overlay, volumes, SEG, cancel, errors."""

from __future__ import annotations

import base64
import gzip
import io
import json
import sqlite3
import threading
import time

import nibabel as nib
import numpy as np
import pydicom
import pytest

from tests.unit.mri.mri_inputs import case_dicom_files, four_d_nifti, nifti_bytes, zip_bytes
from training_export.synthetic_mri import synthetic_case
from training_export.train_mri import dice

ROUTE = "/predict/mri_segmentation"


@pytest.fixture(scope="module")
def client(inprocess_client):
    return inprocess_client


@pytest.fixture(scope="module")
def case():
    return synthetic_case(424_242, (96, 96, 64), (2.0, 2.0, 2.0))


def submit(client, files, **data) -> str:
    """Submit a task and return its id once BentoML no longer reports it in progress (the test client normally
    returns after the task's background run, but `/get` of a task still running answers 400)."""
    response = client.post(f"{ROUTE}/submit", files=files, data={"patient_id": "P123456", **data})
    assert response.status_code == 200, response.text
    task_id = response.json()["task_id"]
    deadline = time.monotonic() + 120
    while client.get(f"{ROUTE}/status", params={"task_id": task_id}).json()["status"] == "in_progress":
        assert time.monotonic() < deadline, f"task {task_id} still in progress"
        time.sleep(0.05)
    return task_id


def mask_of(body: dict) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(body["result"]["mask"]["data_base64"])))


@pytest.fixture(scope="module")
def nifti_run(client, case):
    task_id = submit(client, [("image", ("case.nii.gz", four_d_nifti(case, compressed=True)))],
                     request_id="req-nifti", xai="true", post_processing=json.dumps({"min_area_pixels": 50}))
    return task_id, client.get(f"{ROUTE}/get", params={"task_id": task_id})


def test_nifti_case_end_to_end(client, case, nifti_run, mri_model_tag) -> None:
    task_id, response = nifti_run
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] and body["task_id"] == task_id and body["request_id"] == "req-nifti"
    assert body["model_version"] == mri_model_tag and body["intended_use"] == "demo, not for clinical use"
    assert client.get(f"{ROUTE}/status", params={"task_id": task_id}).json()["status"] == "completed"
    result = body["result"]
    mask = mask_of(body)
    np.testing.assert_allclose(mask.affine, case.volume.affine, atol=1e-5)  # it overlays the input
    labels = np.asarray(mask.dataobj)
    assert labels.shape == case.volume.shape and set(np.unique(labels)) <= {0, 1, 2, 4}
    assert result["tumor_detected"] and dice(labels > 0, case.labels > 0) > 0.7
    voxel_ml = 2.0 * 2.0 * 2.0 / 1000
    for stats in result["label_statistics"]:
        assert stats["voxel_count"] == int((labels == stats["value"]).sum())
        assert stats["volume_ml"] == pytest.approx(stats["voxel_count"] * voxel_ml, abs=1e-4)
    assert result["tumor_volume_ml"]["total"] == pytest.approx((labels > 0).sum() * voxel_ml, abs=1e-3)
    location = result["tumor_location"]
    centroid = np.argwhere(labels > 0).mean(axis=0)
    np.testing.assert_allclose([location["centroid_x"], location["centroid_y"], location["centroid_z"]], centroid, atol=1e-2)
    assert result["bounding_box"]["max_z"] >= location["centroid_z"] >= result["bounding_box"]["min_z"]
    assert result["mask_preview"]["image_base64"].startswith("data:image/png;base64,")
    assert result["dicom_seg_base64"] is None and result["post_processing"]["min_area_pixels"] == 50
    assert body["volume"]["format"] == "nifti" and body["volume"]["missing_sequences"] == []
    assert [s["matched_by"] for s in body["volume"]["sequences"]] == ["volume_order"] * 4
    assert body["xai"]["grad_cam"]["heatmap_base64"].startswith("data:image/png;base64,")
    polled = client.get(f"/task/{task_id}").json()
    assert polled["status"] == "completed" and polled["progress"] == 100 and polled["completed_at"]
    assert polled["result"]["result"]["tumor_detected"] is True
    assert client.get(f"/predict/task_status/{task_id}").json()["status"] == "completed"


def test_the_base_route_submits_a_task_like_submit(client, case, nifti_run) -> None:
    """The design's `POST /predict/mri_segmentation` is asynchronous: 202 with the task id (BentoML alone would run
    the segmentation inside the request), and the task gives what the same request via /submit gives."""
    response = client.post(ROUTE, files=[("image", ("case.nii.gz", four_d_nifti(case, compressed=True)))],
                           data={"patient_id": "P123456", "request_id": "req-base", "xai": "true",
                                 "post_processing": json.dumps({"min_area_pixels": 50})})
    assert response.status_code == 202, response.text
    assert set(response.json()) == {"task_id", "status"}
    task_id = response.json()["task_id"]
    assert client.get(f"/task/{task_id}").json()["status"] == "completed"
    body = client.get(f"{ROUTE}/get", params={"task_id": task_id}).json()
    assert body["task_id"] == task_id and body["request_id"] == "req-base"
    assert np.array_equal(np.asarray(mask_of(body).dataobj), np.asarray(mask_of(nifti_run[1].json()).dataobj))
    refused = client.post(ROUTE, files=[("image", ("x.nii", b"x"))], data={"patient_id": "John Doe"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "INVALID_REQUEST"


def test_dicom_series_zip_gives_the_same_mask_and_a_seg(client, case, nifti_run) -> None:
    files = case_dicom_files(case)
    members = {f"{sequence}/{i:03d}.dcm": data for sequence, series in files.items() for i, data in enumerate(series)}
    task_id = submit(client, [("image", ("study.zip", zip_bytes(members)))])
    body = client.get(f"{ROUTE}/get", params={"task_id": task_id}).json()
    nifti_labels = np.asarray(mask_of(nifti_run[1].json()).dataobj)
    dicom_mask = mask_of(body)
    np.testing.assert_allclose(dicom_mask.affine, case.volume.affine, atol=1e-4)
    assert np.mean(np.asarray(dicom_mask.dataobj) == nifti_labels) > 0.9999
    seg = pydicom.dcmread(io.BytesIO(base64.b64decode(body["result"]["dicom_seg_base64"])))
    assert seg.Modality == "SEG" and seg.PatientName == "" and seg.PatientID == "P123456"  # the request's, not the file's
    reference = body["volume"]["reference_sequence"]
    uid = next(s["series_uid"] for s in body["volume"]["sequences"] if s["sequence"] == reference)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid


def bentoml_task_count() -> int:
    from api.tasks import bentoml_result_store_path

    with sqlite3.connect(bentoml_result_store_path()) as connection:
        return connection.execute("SELECT count(*) FROM result").fetchone()[0]


def test_one_file_per_sequence_with_sequence_type_and_a_missing_sequence_refused_by_name(client, case) -> None:
    parts = [("image", (f"{i}.nii", nifti_bytes(case.volume.data[i], case.volume.affine))) for i in (3, 1, 0, 2)]
    task_id = submit(client, parts, sequence_type="FLAIR,T1ce,T1,T2")
    body = client.get(f"{ROUTE}/get", params={"task_id": task_id}).json()
    assert body["volume"]["missing_sequences"] == [] and body["result"]["confidence"] == "normal"
    assert [s["sequence"] for s in body["volume"]["sequences"]] == ["T1", "T1ce", "T2", "FLAIR"]

    stored = bentoml_task_count()
    for route in (f"{ROUTE}/submit", ROUTE):  # refused at submission: no task, nothing kept in BentoML's task store
        response = client.post(route, files=parts[:2], data={"patient_id": "P123456", "sequence_type": "FLAIR,T1ce"})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "INVALID_REQUEST" and "['T1', 'T2']" in error["message"]
        assert error["details"] == {"reason": "missing_required_sequences", "missing": ["T1", "T2"],
                                    "required": ["T1", "T1ce", "T2", "FLAIR"], "received": ["FLAIR", "T1ce"]}
    assert bentoml_task_count() == stored


def test_a_missing_sequence_known_only_after_decoding_fails_the_task(client, case) -> None:
    """Without `sequence_type` the submission is accepted; decoding matches the files to T1 and FLAIR by their names,
    and the task fails with the error a submission naming them gets at once. An unknown sequence name is the task's
    to refuse, as before."""
    parts = [("image", (f"{sequence}.nii", nifti_bytes(case.volume.data[i], case.volume.affine)))
             for i, sequence in ((0, "t1"), (3, "flair"))]
    task_id = submit(client, parts)
    polled = client.get(f"/task/{task_id}").json()
    assert polled["status"] == "failed" and polled["error"]["details"]["missing"] == ["T1ce", "T2"], polled
    named = client.post(f"{ROUTE}/submit", files=parts, data={"patient_id": "P123456", "sequence_type": "T1,FLAIR"})
    assert named.status_code == 400 and named.json()["error"]["message"] == polled["error"]["message"]
    assert named.json()["error"]["details"] == polled["error"]["details"]
    unknown = submit(client, parts, sequence_type="T1,DWI")
    assert client.get(f"/task/{unknown}").json()["error"]["details"]["sequence_type"] == ["T1", "DWI"]


def test_uncertainty_on_request(client, case) -> None:
    task_id = submit(client, [("image", ("case.nii.gz", four_d_nifti(case, compressed=True)))], uncertainty="true")
    body = client.get(f"{ROUTE}/get", params={"task_id": task_id}).json()
    uncertainty = body["result"]["uncertainty"]
    assert uncertainty["passes"] == 8 and uncertainty["map"]["shape"] == body["result"]["mask"]["shape"]
    wt = uncertainty["volume_interval_ml"]["WT"]
    assert wt["low"] <= body["result"]["tumor_volume_ml"]["total"] * 1.1 and wt["high"] >= wt["low"]
    assert body["result"]["ood_check"]["flagged"] is False and body["warnings"] == []


def test_credentials_are_not_kept_in_bentomls_task_store(client, nifti_run) -> None:
    from api.tasks import bentoml_result_store_path

    with sqlite3.connect(bentoml_result_store_path()) as connection:
        stored = connection.execute("SELECT input FROM result WHERE task_id = ?", (nifti_run[0],)).fetchone()[0]
    assert b"authorization" not in stored.lower() if isinstance(stored, bytes) else "authorization" not in stored.lower()


def test_cancel_stops_a_running_task(client, case, monkeypatch) -> None:
    """Deterministic: the runner's first window batch waits until the cancel has been answered (a spy on its engine,
    as in test_mri_runner.py), so the cancel always lands while inference runs."""
    import bentoml

    from core.settings import get_settings
    from state.tasks import STEP_PROGRESS, TaskStore, task_store_path

    tasks = TaskStore(task_store_path(get_settings().data_dir))
    engine = bentoml.get_current_service().mri_runner.served.current.engine
    predict, in_inference, cancel_answered, batches = engine.predict, threading.Event(), threading.Event(), []

    def predict_after_the_cancel(windows):
        batches.append(len(windows))
        in_inference.set()
        assert cancel_answered.wait(60)
        return predict(windows)

    monkeypatch.setattr(engine, "predict", predict_after_the_cancel)
    outcome = {}

    def run() -> None:  # the in-process client returns from submit only when the task has ended
        outcome["task_id"] = submit(client, [("image", ("case.nii", four_d_nifti(case)))], request_id="req-cancel",
                                    xai="true")

    worker = threading.Thread(target=run)
    worker.start()
    try:
        assert in_inference.wait(60)
        with sqlite3.connect(tasks.path) as connection:
            [(task_id, step)] = connection.execute("SELECT task_id, current_step FROM tasks WHERE request_id = "
                                                   "'req-cancel'").fetchall()
        assert step == "inference"
        cancelled = client.put(f"{ROUTE}/cancel", params={"task_id": task_id}).json()
    finally:
        cancel_answered.set()
        worker.join(60)
    assert cancelled["status"] == "cancelled" and cancelled["cancelled_at"]
    assert outcome["task_id"] == task_id and batches == [batches[0]]  # stopped after its first window batch
    record = tasks.get(task_id)
    assert record.status == "cancelled" and record.result is None
    assert record.progress < STEP_PROGRESS["explaining"]  # stopped before Grad-CAM and post-processing
    stored = client.get(f"{ROUTE}/get", params={"task_id": task_id})
    assert stored.status_code == 409 and stored.json()["error"]["code"] == "TASK_CANCELLED", stored.text[:500]


def test_failures_carry_the_error_schema(client) -> None:
    task_id = submit(client, [("image", ("x.nii", b"not an image at all"))])
    response = client.get(f"{ROUTE}/get", params={"task_id": task_id})
    assert response.status_code == 400 and response.json()["error"]["code"] == "INVALID_IMAGE_FORMAT"
    polled = client.get(f"/task/{task_id}").json()
    assert polled["status"] == "failed" and polled["error"]["code"] == "INVALID_IMAGE_FORMAT" and polled["failed_at"]
    traversal = submit(client, [("image", ("evil.zip", zip_bytes({"../../etc/x.dcm": b"x"})))])
    assert client.get(f"/task/{traversal}").json()["error"]["code"] == "INVALID_REQUEST"
    invalid = client.post(f"{ROUTE}/submit", files=[("image", ("x.nii", b"x"))], data={"patient_id": "John Doe"})
    assert invalid.status_code == 400 and invalid.json()["error"]["code"] == "INVALID_REQUEST"  # refused before storing
    missing = client.get("/task/no-such-task")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "NOT_FOUND"
    assert client.delete("/task/no-such-task").status_code == 404


def test_model_info_lists_the_segmenter(client) -> None:
    models = {m["model_id"]: m for m in client.get("/model_info").json()["models"]}
    mri = models["mri_segmentation"]
    assert mri["type"] == "segmentation" and mri["xai_supported"] == ["grad_cam"]
    assert {"dice_wt", "dice_tc", "dice_et"} <= set(mri["metrics"])
    assert client.get("/health").json()["models"]["mri_segmentation"]["loaded"] is True


def real_study(name: str) -> list[tuple[str, tuple[str, bytes]]]:
    """A real file nobody here wrote, sent as every sequence the demo model requires."""
    from pydicom.data import get_testdata_file

    from tests.unit.mri.mri_inputs import NIBABEL_DATA
    from training_export.foreign_volumes import as_every_sequence, dicom_copies

    sequences = ("T1", "T1ce", "T2", "FLAIR")
    if name == "0.dcm+1.dcm":
        study = dicom_copies([NIBABEL_DATA / "0.dcm", NIBABEL_DATA / "1.dcm"], sequences)
    elif name.endswith(".dcm"):
        study = dicom_copies([get_testdata_file(name)], sequences)
    elif name == "example4d.nii.gz":  # two volumes per file: sent twice
        study = as_every_sequence(name, name, (NIBABEL_DATA / name).read_bytes(), sequences[:2])
    else:
        study = as_every_sequence(name, name, (NIBABEL_DATA / name).read_bytes(), sequences)
    return [("image", upload) for upload in study.uploads]


@pytest.mark.parametrize("name", ["anatomical.nii", "standard.nii.gz", "example4d.nii.gz", "0.dcm+1.dcm",
                                  "MR_small.dcm", "MR_small_jp2klossless.dcm"])
def test_real_files_are_never_a_tumour_finding_without_a_warning(client, name) -> None:
    task_id = submit(client, real_study(name), sequence_type="T1,T1ce,T2,FLAIR")
    response = client.get(f"{ROUTE}/get", params={"task_id": task_id})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["result"]["mask"]["shape"] == body["volume"]["shape"]
    assert body["result"]["mask_preview"]["image_base64"].startswith("data:image/png")
    assert body["result"]["ood_check"]["flagged"] and "input unlike the model's training data" in body["warnings"]
    assert body["result"]["confidence"] == "reduced" and body["result"]["confidence_reasons"] == ["out_of_distribution"]


def test_the_issue_case_one_healthy_t1_is_refused_naming_the_missing_sequences(client) -> None:
    from tests.unit.mri.mri_inputs import NIBABEL_DATA

    response = client.post(f"{ROUTE}/submit", data={"patient_id": "P123456", "sequence_type": "T1"},
                           files=[("image", ("anatomical.nii", (NIBABEL_DATA / "anatomical.nii").read_bytes()))])
    assert response.status_code == 400 and response.json()["error"]["details"]["missing"] == ["T1ce", "T2", "FLAIR"]


def test_dicom_without_tumour_has_no_seg_and_says_so(client) -> None:
    from training_export.synthetic_mri import dicom_series

    blank = [data for sequence in ("T1", "T1ce", "T2", "FLAIR")
             for data in dicom_series(np.zeros((32, 32, 4)), np.diag([3.0, 3.0, 3.0, 1.0]), sequence, patient_id="P1",
                                      study_uid="1.2.3", frame_of_reference_uid="1.2.4")]
    task_id = submit(client, [("image", (f"{i}.dcm", data)) for i, data in enumerate(blank)])
    body = client.get(f"{ROUTE}/get", params={"task_id": task_id}).json()
    assert body["result"]["tumor_detected"] is False and body["result"]["dicom_seg_base64"] is None
    assert body["result"]["tumor_location"] is None and body["result"]["tumor_volume_ml"]["total"] == 0.0
    assert "no tumour was found, so no DICOM SEG was written" in body["warnings"]
    assert body["result"]["ood_check"] == {"score": "descriptor_mahalanobis", "distance": None,
                                           "threshold": body["result"]["ood_check"]["threshold"], "flagged": True}
