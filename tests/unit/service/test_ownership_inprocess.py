"""Cached inputs and results belong to the token subject that made the request (issue #24): another subject gets the
same 404 as for an unknown id from `/xai/explain` and `/feedback`, and the same request id of two subjects is two
entries; the reviewer recorded with a verdict is the token's subject."""

from __future__ import annotations

import io
import time

import bentoml
import jwt
import numpy as np
from PIL import Image
from sqlalchemy import select

from state.feedback_db import feedback_records
from tests.conftest import IN_PROCESS_SECRET

REQUEST_ID = "shared-request-7"


def headers(subject: str) -> dict[str, str]:
    token = jwt.encode({"sub": subject, "exp": int(time.time()) + 600}, IN_PROCESS_SECRET, algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


def png(seed: int) -> bytes:
    image = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64), dtype=np.uint8)).save(image, format="PNG")
    return image.getvalue()


def classify(client, subject: str, seed: int) -> dict:
    answer = client.post("/predict/ct_classification", files={"image": ("ct.png", png(seed))},
                         data={"patient_id": "P1", "request_id": REQUEST_ID}, headers=headers(subject))
    assert answer.status_code == 200, answer.text
    return answer.json()


def review(client, subject: str, request_id: str = REQUEST_ID):
    return client.post("/feedback", json={"request_id": request_id, "verdict": "accept", "reviewer_id": "whoever"},
                       headers=headers(subject))


def explain(client, subject: str, request_id: str = REQUEST_ID):
    return client.post("/xai/explain", json={"request_id": request_id}, headers=headers(subject))


def test_another_subject_can_neither_read_nor_overwrite_a_cached_request(inprocess_client) -> None:
    mine = classify(inprocess_client, "dr-a", seed=11)
    unknown = explain(inprocess_client, "dr-b", "never-made")
    assert unknown.status_code == 404
    for answer in (explain(inprocess_client, "dr-b"), review(inprocess_client, "dr-b")):
        assert answer.status_code == 404
        assert answer.json()["error"]["message"] == unknown.json()["error"]["message"]  # nothing tells it exists

    theirs = classify(inprocess_client, "dr-b", seed=12)  # the same request id: another entry
    assert theirs["metadata"]["input"]["sha256"] != mine["metadata"]["input"]["sha256"]
    assert explain(inprocess_client, "dr-a").status_code == 200
    receipts = {subject: review(inprocess_client, subject).json() for subject in ("dr-a", "dr-b")}
    assert receipts["dr-a"]["input_sha256"] == mine["metadata"]["input"]["sha256"]
    assert receipts["dr-b"]["input_sha256"] == theirs["metadata"]["input"]["sha256"]

    store = bentoml.get_current_service().feedback_store
    with store.engine.connect() as connection:
        reviewers = {row.id: row.reviewer_id for row in connection.execute(
            select(feedback_records).where(feedback_records.c.request_id == REQUEST_ID))}
    assert reviewers == {receipts["dr-a"]["feedback_id"]: "dr-a", receipts["dr-b"]["feedback_id"]: "dr-b"}


def test_a_subject_that_is_no_plain_id_is_recorded_as_a_pseudonym(inprocess_client) -> None:
    subject = "Johanna.Doe@hospital.example"
    classify(inprocess_client, subject, seed=13)
    receipt = review(inprocess_client, subject).json()
    store = bentoml.get_current_service().feedback_store
    with store.engine.connect() as connection:
        [row] = connection.execute(select(feedback_records).where(feedback_records.c.id == receipt["feedback_id"]))
    assert row.reviewer_id.startswith("sub-") and "Johanna" not in row.reviewer_id


def test_an_mri_task_s_result_belongs_to_its_submitter(inprocess_client) -> None:
    """The task runs after the submission answered: it still caches its result for the submitter alone."""
    from tests.unit.mri.mri_inputs import four_d_nifti, small_case

    route = "/predict/mri_segmentation"
    submitted = inprocess_client.post(f"{route}/submit", files={"image": ("case.nii.gz", four_d_nifti(small_case(),
                                      compressed=True))}, data={"patient_id": "P1", "request_id": "mri-owned"},
                                      headers=headers("dr-mri"))
    assert submitted.status_code == 200, submitted.text
    task_id = submitted.json()["task_id"]
    deadline = time.monotonic() + 300
    status_of = lambda: inprocess_client.get(f"{route}/status", params={"task_id": task_id},  # noqa: E731
                                             headers=headers("dr-mri")).json()["status"]
    while (status := status_of()) == "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert status == "completed"
    assert inprocess_client.get(f"{route}/status", params={"task_id": task_id}, headers=headers("dr-other")).status_code == 404
    assert review(inprocess_client, "dr-other", "mri-owned").status_code == 404
    assert review(inprocess_client, "dr-mri", "mri-owned").status_code == 200
