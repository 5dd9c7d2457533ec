"""Doctors' verdicts on results (human in the loop): the `/feedback` contract, and the checks a verdict must pass
before `state.feedback.FeedbackStore` keeps it.

A classification is corrected with a label, a segmentation with a mask: a NIfTI label volume on the grid of the
response's mask (the input's), checked against the request's grid and the model's labels.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator

from state.request_cache import CachedRequest
from core.errors import ImageTooLarge, InvalidRequest
from state.feedback import FeedbackEntry, FeedbackStore
from monitoring import metrics

AFFINE_TOLERANCE_MM = 1e-3
"""How far a corrected mask's voxel-to-world affine may differ from the input's (NIfTI stores it as float32)."""


REVIEWER_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def reviewer_of(subject: str) -> str:
    """The reviewer id recorded for a token subject: the subject itself where it is a plain id, else a stable
    pseudonym of it (an e-mail address or a name never reaches the feedback store)."""
    if REVIEWER_ID.fullmatch(subject):
        return subject
    return "sub-" + hashlib.sha256(subject.encode()).hexdigest()[:16]


class FeedbackRequest(BaseModel):
    """A reviewer's verdict on an earlier result."""

    request_id: str = Field(min_length=1, max_length=128)
    verdict: Literal["accept", "correct", "reject"]
    corrected_label: str | None = Field(default=None, max_length=64, description="classification requests")
    corrected_mask: str | None = Field(
        default=None, description="segmentation requests: base64 NIfTI (.nii or .nii.gz) label volume on the grid and "
        "affine of the response's mask, with the model's label values")
    reviewer_id: str = Field(min_length=1, max_length=64, pattern=REVIEWER_ID.pattern,
                             description="recorded from the token's subject instead where auth is on")
    comment: str = Field(default="", max_length=2000)

    @model_validator(mode="after")
    def _correction_matches_verdict(self) -> FeedbackRequest:
        given = [name for name in ("corrected_label", "corrected_mask") if getattr(self, name)]
        if self.verdict == "correct" and len(given) != 1:
            raise ValueError("a 'correct' verdict needs one of corrected_label (classification) or corrected_mask "
                             "(segmentation)")
        if self.verdict != "correct" and given:
            raise ValueError(f"{given[0]} goes with a 'correct' verdict only")
        return self


class FeedbackReceipt(BaseModel):
    success: bool = True
    feedback_id: int
    request_id: str
    model_id: str
    model_version: str
    input_sha256: str
    verdict: str


def _is_segmentation(cached: CachedRequest) -> bool:
    """A segmentation request caches its predicted mask (pipelines/mri.py `cached_segmentation`)."""
    return "mask" in cached.arrays


def _checked_label(feedback: FeedbackRequest, cached: CachedRequest) -> None:
    """A classification is corrected with one of the model's labels, never with a mask."""
    if feedback.corrected_mask:
        raise InvalidRequest(f"this request_id was a {cached.model_id} request: correct it with "
                             "corrected_label; corrected_mask is for segmentation requests")
    labels = cached.facts.get("labels", [])
    if feedback.corrected_label is not None and feedback.corrected_label not in labels:
        raise InvalidRequest(f"corrected_label must be one of {labels}", {"corrected_label": feedback.corrected_label})


def _reviewed_mask(feedback: FeedbackRequest, cached: CachedRequest) -> np.ndarray | None:
    """The mask a segmentation verdict stands for: the doctor's on 'correct', the model's on 'accept', none on 'reject'."""
    if feedback.corrected_label:
        raise InvalidRequest(f"this request_id was a {cached.model_id} request: correct it with "
                             "corrected_mask (a NIfTI label volume); corrected_label is for classification requests")
    if feedback.verdict == "accept":
        return cached.arrays["mask"]
    return decode_mask(feedback.corrected_mask, cached) if feedback.corrected_mask else None


def decode_mask(data_base64: str, cached: CachedRequest) -> np.ndarray:
    """The reviewer's label volume as uint8, once it is a NIfTI on the request's grid and affine holding only the
    model's label values."""
    grid = cached.arrays["mask"].shape
    labels: dict[str, int] = cached.facts["mask_labels"]
    details = {"expected_shape": list(grid), "labels": labels}
    try:
        data = base64.b64decode(data_base64, validate=True)
    except binascii.Error as exc:
        raise InvalidRequest(f"corrected_mask is not valid base64: {exc}") from exc
    try:
        from preprocessing.nifti import decode_nifti  # MRI only: nibabel stays out of workers that never see one

        volumes = decode_nifti(data, None, max_voxels=int(np.prod(grid)))
    except ImageTooLarge as exc:  # more voxels than the grid: refused before it is decompressed
        raise InvalidRequest(f"corrected_mask must be on the request's grid {list(grid)}", {**exc.details, **details}) from exc
    if len(volumes) != 1 or volumes[0].data.shape != grid:
        shape = list(volumes[0].data.shape) + ([len(volumes)] if len(volumes) > 1 else [])
        raise InvalidRequest(f"corrected_mask has shape {shape}; it must be on the request's grid {list(grid)}",
                             {**details, "shape": shape})
    mask = volumes[0]
    if not np.allclose(mask.affine, cached.arrays["input_affine"], rtol=0, atol=AFFINE_TOLERANCE_MM):
        raise InvalidRequest("corrected_mask's affine differs from the input's: send it in the geometry of the "
                             "response's mask", {**details, "affine": np.round(mask.affine, 4).tolist()})
    unknown = [value if value % 1 else int(value) for value in np.setdiff1d(mask.data, list(labels.values())).tolist()]
    if unknown:
        raise InvalidRequest(f"corrected_mask holds values {unknown[:10]} that are not this model's labels {labels}",
                             details)
    return mask.data.astype(np.uint8)


def record_feedback(store: FeedbackStore, feedback: FeedbackRequest, cached: CachedRequest) -> FeedbackReceipt:
    """Check the verdict against the request it reviews (a label for a classification, a mask for a segmentation)
    and store it with the request's model version, input hash and de-identified input."""
    mask = None
    if _is_segmentation(cached):
        mask = _reviewed_mask(feedback, cached)
    else:
        _checked_label(feedback, cached)
    feedback_id = store.record(FeedbackEntry(
        request_id=cached.request_id, model_id=cached.model_id, model_version=cached.model_version,
        input_sha256=cached.input_sha256, predicted=cached.facts.get("predicted_class"), verdict=feedback.verdict,
        corrected_label=feedback.corrected_label, reviewer_id=feedback.reviewer_id, comment=feedback.comment,
        arrays=cached.arrays, mask=mask, mask_affine=cached.arrays.get("input_affine"),
    ))
    metrics.observe_verdict(cached.model_id, cached.model_version, feedback.verdict, cached.facts.get("predicted_class"),
                            feedback.corrected_label, cached.facts.get("labels", []))
    return FeedbackReceipt(feedback_id=feedback_id, request_id=cached.request_id, model_id=cached.model_id,
                           model_version=cached.model_version, input_sha256=cached.input_sha256,
                           verdict=feedback.verdict)
