"""Safe on a hospital network (issue #24), against real `bentoml serve` processes: a server refuses to start open
(auth off beyond loopback, or auth on without a real key), a refused request leaves no patient value in the server
log, no request adds metric series beyond the service's routes, and a task is its submitter's alone."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from pydicom.data import get_testdata_file

from bench.harness import ROOT, free_port, stop_group, start_process
from tests.http.conftest import make_token
from tests.http.test_mri_http import wait_for
from tests.unit.mri.mri_inputs import case_dicom_files, four_d_nifti, phi_values, small_case, with_phi, zip_bytes
from training_export.synthetic_mri import synthetic_case

START_BOUND_S = 180.0
PHI_NAME = "Doe^Johanna"


def refused_start(tmp_path: Path, env: dict[str, str], host: list[str]) -> str:
    """Run `bentoml serve` with `env`; it must exit non-zero by itself: its output."""
    command = [sys.executable, "-m", "bentoml", "serve", "service:NeuroNova", *host, "--port", "{port}"]
    log = tmp_path / "refused.log"
    process = start_process(command, {"NEURONOVA_DATA_DIR": str(tmp_path / "data"), **env}, log, free_port())
    try:
        assert process.wait(timeout=START_BOUND_S) != 0
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server started instead of refusing:\n{log.read_text()[-3000:]}")
    finally:
        stop_group(process, grace_s=5)
    return log.read_text()


def test_without_auth_the_server_refuses_every_address_but_loopback(tmp_path: Path) -> None:
    output = refused_start(tmp_path, {"NEURONOVA_AUTH__ENABLED": "false"}, [])  # bentoml serve's default: 0.0.0.0
    assert "NEURONOVA_AUTH__ALLOW_UNAUTHENTICATED_NETWORK" in output and "0.0.0.0" in output


def test_with_auth_the_server_refuses_a_short_secret(tmp_path: Path) -> None:
    output = refused_start(tmp_path, {"NEURONOVA_AUTH__SECRET": "x"}, ["--host", "127.0.0.1"])
    assert "NEURONOVA_AUTH__SECRET must be at least 32 bytes" in output


def test_make_serve_binds_loopback() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "HOST ?= 127.0.0.1" in makefile and "bentoml serve service:NeuroNova --host $(HOST)" in makefile


def test_refused_requests_leave_no_patient_value_in_the_log(http: httpx.Client, server_state: Path) -> None:
    """BentoML logs every request its validation refuses with the refused values; ours must not reach the log."""
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    answers = [
        http.post("/predict/biomarker_prediction", json={"patient_id": PHI_NAME, "biomarkers": {"age": PHI_NAME}}),
        http.post("/predict/biomarker_prediction", json={"patient_id": PHI_NAME, "biomarkers": [PHI_NAME]}),
        http.post("/predict/ct_classification", files={"image": ("ct.dcm", ct)}, data={"patient_id": PHI_NAME}),
        http.post("/predict/ct_classification", files={"image": ("ct.dcm", ct)},
                  data={"patient_id": "P000001", "xai": PHI_NAME}),
        http.post("/xai/explain", json={"request_id": PHI_NAME, "method": PHI_NAME}),
        http.post("/feedback", json={"request_id": "r1", "verdict": PHI_NAME, "reviewer_id": PHI_NAME}),
    ]
    assert all(400 <= answer.status_code < 500 for answer in answers), [a.text for a in answers]
    assert all(PHI_NAME not in answer.text for answer in answers)
    http.get("/health")  # the log lines of the refusals are written before this answer
    log = (server_state / "server.log").read_text(errors="replace")
    assert "Exception on" in log or "validation error" in log  # BentoML did log the refusals
    assert PHI_NAME not in log and "Johanna" not in log


def distinctive(values: list[str]) -> list[str]:
    """The values a log could only hold by leaking them (names, ids, free text), not digits a timestamp may hold."""
    return [value for value in values if len(value) >= 6 and any(c.isalpha() for c in value)]


def test_patient_data_in_every_route_never_reaches_the_log(http: httpx.Client, server_url: str, server_state: Path,
                                                           admin_headers: dict[str, str]) -> None:
    """Valid requests whose DICOM carries a full patient module (names, MRNs, history, private tags) and refused
    requests with a person's name in every field, on every route: nothing of them in any process's output (the
    arbiter, the API workers and the runners all write the server log) nor in any answer."""
    ct = with_phi([Path(get_testdata_file("CT_small.dcm")).read_bytes()])[0]
    study = zip_bytes({f"{sequence}/{i:03d}.dcm": data for sequence, series in case_dicom_files(small_case()).items()
                       for i, data in enumerate(with_phi(series))})
    phi_form = {"patient_id": PHI_NAME, "request_id": PHI_NAME}
    task = http.post("/predict/mri_segmentation/submit", files={"image": ("study.zip", study)},
                     data={"patient_id": "P000045"})
    assert task.status_code in (200, 202), task.text
    answers = [
        http.post("/predict/ct_classification", files={"image": ("ct.dcm", ct)},
                  data={"patient_id": "P000045", "xai": "true"}),
        http.post("/predict/ct_classification", files={"image": (f"{PHI_NAME}.dcm", ct)}, data=phi_form),
        http.post("/predict/mri_segmentation/submit", files={"image": (f"{PHI_NAME}.zip", study)}, data=phi_form),
        http.post("/predict/biomarker_prediction", json={**phi_form, "biomarkers": {PHI_NAME: PHI_NAME}}),
        http.post("/xai/explain", json={"request_id": PHI_NAME, "method": "grad_cam"}),
        http.post("/feedback", json={"request_id": PHI_NAME, "verdict": "reject", "reviewer_id": PHI_NAME,
                                     "comment": PHI_NAME}),
        http.get(f"/task/{PHI_NAME}"), http.delete(f"/task/{PHI_NAME}"), http.get(f"/predict/task_status/{PHI_NAME}"),
        http.get("/model_info", params={"model_id": PHI_NAME}),
        httpx.post(f"{server_url}/update_model", headers=admin_headers, timeout=60,
                   files={"export": (f"{PHI_NAME}.bentomodel", b"not an export")},
                   data={"model_id": PHI_NAME, "version": PHI_NAME}),
        httpx.post(f"{server_url}/pacs/notify", headers=admin_headers, timeout=60,
                   json={"study_instance_uid": PHI_NAME}),
    ]
    assert answers[0].status_code == 200, answers[0].text
    assert all(answer.status_code < 500 for answer in answers), [(a.request.url, a.status_code) for a in answers]
    polled = wait_for(http, task.json()["task_id"], {"completed", "failed"})  # the whole pipeline ran (and logged)
    assert polled["status"] == "completed", polled.get("error")
    leaked = distinctive([*phi_values(), PHI_NAME, "Johanna"])
    assert [(str(answer.request.url), value) for answer in answers for value in leaked if value in answer.text] == []
    http.get("/health")  # the log lines of the requests above are written before this answer
    log = (server_state / "server.log").read_text(errors="replace")
    assert [value for value in leaked if value in log] == []


def endpoint_labels(url: str) -> set[str]:
    """The `endpoint` label values of every series on the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {sample.labels["endpoint"] for family in text_string_to_metric_families(text)
            for sample in family.samples if "endpoint" in sample.labels}


def test_random_paths_and_task_ids_add_no_metric_series(server_url: str, http: httpx.Client) -> None:
    """Requests to 200 random paths, without a token, and task polls by id leave the endpoint labels to the
    service's routes (unknown paths: `other`; a task id: its placeholder)."""
    for number in range(200):
        httpx.get(f"{server_url}/probe-{number}-{uuid.uuid4().hex}", timeout=30)
    for _ in range(3):
        http.get(f"/task/{uuid.uuid4().hex}")
    labels = endpoint_labels(server_url)
    assert not any("probe-" in label for label in labels) and "other" in labels
    assert "/task/{task_id}" in labels and not any(re.fullmatch(r"/task/[0-9a-f]{32}", label) for label in labels)
    before = len(labels)
    for number in range(200):
        httpx.post(f"{server_url}/another-{number}", timeout=30)
    assert len(endpoint_labels(server_url)) == before


def test_another_subject_cannot_see_or_cancel_a_task(server_url: str, http: httpx.Client) -> None:
    """An MRI task submitted with one token: a token of another subject gets the unknown-id 404 on every task route
    (ours and BentoML's) and cancels nothing; the submitter polls and cancels it."""
    case = synthetic_case(21)
    submitted = http.post("/predict/mri_segmentation/submit", files={"image": ("case.nii.gz", four_d_nifti(case))},
                          data={"patient_id": "P000601"})
    assert submitted.status_code == 200, submitted.text
    task_id = submitted.json()["task_id"]
    other = {"Authorization": f"Bearer {make_token(subject='another-clinician')}"}
    with httpx.Client(base_url=server_url, headers=other, timeout=60) as intruder:
        unknown = intruder.get(f"/task/{uuid.uuid4().hex}").json()["error"]
        answers = [intruder.get(f"/task/{task_id}"), intruder.get(f"/predict/task_status/{task_id}"),
                   intruder.delete(f"/task/{task_id}"),
                   intruder.get("/predict/mri_segmentation/status", params={"task_id": task_id}),
                   intruder.get("/predict/mri_segmentation/get", params={"task_id": task_id}),
                   intruder.put("/predict/mri_segmentation/cancel", params={"task_id": task_id})]
    for answer in answers:
        assert answer.status_code == 404, answer.text
        assert answer.json()["error"]["message"] == unknown["message"]
    assert http.get(f"/task/{task_id}").json()["status"] in ("pending", "processing", "completed")
    assert http.delete(f"/task/{task_id}").status_code in (200, 404)  # 404 only if it already finished
    assert http.get(f"/task/{task_id}").json()["status"] in ("cancelled", "completed")
