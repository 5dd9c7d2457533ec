"""`/feedback` on an MRI segmentation through the in-process service: the task caches its prepared input, a reviewer's
corrected mask (the delivered mask with a region erased) is stored with it, in the store the service built from its
settings (PostgreSQL where the session runs it, tests/conftest.py), and read back for fine-tuning as the fine-tuning
job reads it; malformed masks and corrections of the wrong kind are refused with the SPEC error schema. Both
databases' storage of masks is tested directly in tests/unit/api/test_feedback_store.py."""

from __future__ import annotations

import base64
import hashlib
import io

import bentoml
import numpy as np
import pytest
from PIL import Image

from state.feedback import FeedbackStore
from pipelines.mri import delivered_volume
from core.cards.segmentation import SegmentationCard
from core.settings import get_settings
from core.schemas import MaskOutput
from postprocessing.outputs import mask_nifti_gz
from preprocessing.volumes import prepare_labels
from tests.unit.mri.mri_inputs import four_d_nifti
from training_export.synthetic_mri import SyntheticCase, synthetic_case

ROUTE = "/predict/mri_segmentation"
REQUEST_ID = "req-mri-feedback"


@pytest.fixture(scope="module")
def segmented(inprocess_client) -> tuple[SyntheticCase, bytes, dict]:
    """One small synthetic case segmented by the served demo model: (case, upload, response body)."""
    case = synthetic_case(515, (64, 64, 40), (2.0, 2.0, 2.0))
    upload = four_d_nifti(case, compressed=True)
    submitted = inprocess_client.post(f"{ROUTE}/submit", files=[("image", ("case.nii.gz", upload))],
                                      data={"patient_id": "P123456", "request_id": REQUEST_ID})
    assert submitted.status_code == 200, submitted.text
    response = inprocess_client.get(f"{ROUTE}/get", params={"task_id": submitted.json()["task_id"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["result"]["tumor_detected"]
    return case, upload, body


@pytest.fixture
def store() -> FeedbackStore:
    """The feedback store the running service built (`FeedbackStore.from_settings`)."""
    return bentoml.get_current_service().feedback_store


def mask_b64(labels: np.ndarray, affine: np.ndarray) -> str:
    return base64.b64encode(mask_nifti_gz(labels, affine)).decode()


def test_a_corrected_mask_is_stored_with_the_input_for_fine_tuning(inprocess_client, segmented, store):
    case, upload, body = segmented
    mask = MaskOutput.model_validate(body["result"]["mask"])
    predicted, affine = delivered_volume(mask), np.asarray(mask.affine)
    np.testing.assert_allclose(affine, case.volume.affine, atol=1e-6)  # the input's grid
    corrected = predicted.copy()
    corrected[:, :, int(np.argwhere(predicted > 0)[:, 2].mean()):] = 0  # the reviewer erases the upper half
    assert 0 < (corrected > 0).sum() < (predicted > 0).sum()
    stored_before = len(store.labelled_inputs("mri_segmentation"))
    posted = inprocess_client.post("/feedback", json={
        "request_id": REQUEST_ID, "verdict": "correct", "corrected_mask": mask_b64(corrected, affine),
        "reviewer_id": "dr_mri", "comment": "tumour ends lower"})
    assert posted.status_code == 200, posted.text
    receipt = posted.json()
    assert receipt["model_id"] == "mri_segmentation" and receipt["model_version"] == body["model_version"]
    assert receipt["input_sha256"] == hashlib.sha256(upload).hexdigest() == body["volume"]["sha256"][0]
    accepted = inprocess_client.post("/feedback", json={"request_id": REQUEST_ID, "verdict": "accept",
                                                        "reviewer_id": "dr_other"})
    assert accepted.status_code == 200, accepted.text

    # Read back as the fine-tuning job does: a store of its own from the same settings (newest two: this test's).
    reader = FeedbackStore.from_settings(get_settings())
    assert len(reader.labelled_inputs("mri_segmentation")) == stored_before + 2
    volumes = list(reader.labelled_volumes("mri_segmentation"))[-2:]
    spec = SegmentationCard.model_validate(next(m["card"] for m in inprocess_client.get("/model_info").json()["models"]
                                                if m["model_id"] == "mri_segmentation")).input
    assert len(volumes) == 2
    for volume, reviewed in zip(volumes, (corrected, predicted)):
        assert volume.tensor.shape == (len(spec.sequences), *volume.labels.shape) and volume.tensor.std() > 0.5
        # the label map the training pipeline prepares from a mask on the input's grid (2 mm -> 3 mm: nearest-neighbour
        # ties may break the other way on a few boundary voxels)
        assert np.mean(volume.labels == prepare_labels(reviewed, case.volume.affine, spec)) > 0.99
    assert 0 < (volumes[0].labels > 0).sum() < 0.9 * (volumes[1].labels > 0).sum()


def test_malformed_masks_and_corrections_of_the_wrong_kind_are_refused(inprocess_client, segmented, store):
    mask = MaskOutput.model_validate(segmented[2]["result"]["mask"])
    labels, affine = delivered_volume(mask), np.asarray(mask.affine)
    image = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (64, 64), dtype=np.uint8)).save(image, format="PNG")
    ct = inprocess_client.post("/predict/ct_classification", files={"image": ("ct.png", image.getvalue())},
                               data={"patient_id": "P1", "request_id": "req-ct-mask"})
    assert ct.status_code == 200, ct.text
    refusals = [
        (REQUEST_ID, {"corrected_mask": mask_b64(labels[:, :, :-1], affine)}, "INVALID_REQUEST", "has shape"),
        (REQUEST_ID, {"corrected_mask": "not base64 at all!"}, "INVALID_REQUEST", "not valid base64"),
        (REQUEST_ID, {"corrected_mask": base64.b64encode(image.getvalue()).decode()}, "INVALID_IMAGE_FORMAT", "NIfTI"),
        (REQUEST_ID, {"corrected_label": "Glioma"}, "INVALID_REQUEST", "correct it with corrected_mask"),
        ("req-ct-mask", {"corrected_mask": mask_b64(labels, affine)}, "INVALID_REQUEST", "correct it with corrected_label"),
    ]
    stored_before = len(store.labelled_inputs("mri_segmentation")), len(store.labelled_inputs("ct_classification"))
    for request_id, correction, code, message in refusals:
        response = inprocess_client.post("/feedback", json={"request_id": request_id, "verdict": "correct",
                                                            "reviewer_id": "dr_x", **correction})
        error = response.json()
        assert response.status_code == 400 and error["success"] is False, response.text[:300]
        assert error["error"]["code"] == code and message in error["error"]["message"] and error["error"]["timestamp"]
    stored_after = len(store.labelled_inputs("mri_segmentation")), len(store.labelled_inputs("ct_classification"))
    assert stored_after == stored_before
