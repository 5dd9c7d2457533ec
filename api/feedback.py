"""Doctors' verdicts on results (human in the loop), stored durably for `training_export` to build fine-tuning sets.

A classification is corrected with a label, a segmentation with a mask: a NIfTI label volume on the grid of the
response's mask (the input's), checked against the request's grid and the model's labels. Embedded default: SQLite
in the data dir, each reviewed request's de-identified model input (pixels only) and reviewed mask an .npz file beside
it. Production: PostgreSQL by URL (`feedback.database_url`), inputs and masks stored in the database with the record,
so every API host and the fine-tuning job need nothing but the URL.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, Field, model_validator
from sqlalchemy import Connection, func, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from api.request_cache import CachedRequest
from core.errors import ImageTooLarge, InvalidRequest
from core.feedback_db import (
    default_database_url,
    feedback_inputs,
    feedback_masks,
    feedback_records,
    open_engine,
)
from core.settings import Settings

AFFINE_TOLERANCE_MM = 1e-3
"""How far a corrected mask's voxel-to-world affine may differ from the input's (NIfTI stores it as float32)."""


class FeedbackRequest(BaseModel):
    """A reviewer's verdict on an earlier result."""

    request_id: str = Field(min_length=1, max_length=128)
    verdict: Literal["accept", "correct", "reject"]
    corrected_label: str | None = Field(default=None, max_length=64, description="classification requests")
    corrected_mask: str | None = Field(
        default=None, description="segmentation requests: base64 NIfTI (.nii or .nii.gz) label volume on the grid and "
        "affine of the response's mask, with the model's label values")
    reviewer_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
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


@dataclass(frozen=True)
class LabelledVolume:
    """A reviewed segmentation for fine-tuning: the model input (C, X, Y, Z) float32 and its reviewed label map
    (X, Y, Z) uint8, both on the model grid given by `affine`."""

    tensor: np.ndarray
    labels: np.ndarray
    affine: np.ndarray


class InputStore(Protocol):
    """Where the de-identified inputs and reviewed masks live, by content-addressed name (`<sha256 of the arrays>.npz`)."""

    def save(self, connection: Connection, name: str, npz: bytes) -> None: ...

    def load(self, connection: Connection, name: str) -> bytes: ...


class InputFiles:
    """Inputs as files beside an embedded database: written whole (fsync, then an atomic rename) before the record."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def save(self, connection: Connection, name: str, npz: bytes) -> None:
        path = self.directory / name
        if path.exists():
            return
        with tempfile.NamedTemporaryFile(dir=self.directory, suffix=".tmp", delete=False) as temp:
            temp.write(npz)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp.name, path)

    def load(self, connection: Connection, name: str) -> bytes:
        return (self.directory / name).read_bytes()


class InputRows:
    """Inputs as bytes in the `feedback_inputs` table, committed in the record's transaction (server databases)."""

    def save(self, connection: Connection, name: str, npz: bytes) -> None:
        connection.execute(pg_insert(feedback_inputs).values(input_file=name, npz=npz).on_conflict_do_nothing())

    def load(self, connection: Connection, name: str) -> bytes:
        return connection.execute(select(feedback_inputs.c.npz).where(feedback_inputs.c.input_file == name)).scalar_one()


def _npz(arrays: dict[str, np.ndarray]) -> tuple[str, bytes]:
    """The arrays' content-addressed name (one file per distinct input or mask, whichever model version made it) and
    bytes."""
    digest = hashlib.sha256()
    for array in arrays.values():
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return f"{digest.hexdigest()}.npz", buffer.getvalue()


def _is_segmentation(cached: CachedRequest) -> bool:
    """A segmentation request caches its predicted mask (api/mri.py `cached_segmentation`)."""
    return "mask" in cached.arrays


def _checked_label(feedback: FeedbackRequest, cached: CachedRequest) -> None:
    """A classification is corrected with one of the model's labels, never with a mask."""
    if feedback.corrected_mask:
        raise InvalidRequest(f"request {cached.request_id!r} was a {cached.model_id} request: correct it with "
                             "corrected_label; corrected_mask is for segmentation requests")
    labels = cached.facts.get("labels", [])
    if feedback.corrected_label is not None and feedback.corrected_label not in labels:
        raise InvalidRequest(f"corrected_label must be one of {labels}", {"corrected_label": feedback.corrected_label})


def _reviewed_mask(feedback: FeedbackRequest, cached: CachedRequest) -> np.ndarray | None:
    """The mask a segmentation verdict stands for: the doctor's on 'correct', the model's on 'accept', none on 'reject'."""
    if feedback.corrected_label:
        raise InvalidRequest(f"request {cached.request_id!r} was a {cached.model_id} request: correct it with "
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


class FeedbackStore:
    """Append-only feedback records in SQL (SQLite file in `directory` unless `database_url` names another)."""

    def __init__(self, directory: Path, database_url: str | None = None) -> None:
        if not database_url:
            directory.mkdir(parents=True, exist_ok=True)
        self.engine = open_engine(database_url or default_database_url(directory))
        self.inputs: InputStore = InputFiles(directory / "inputs") if self.engine.dialect.name == "sqlite" else InputRows()

    @classmethod
    def from_settings(cls, settings: Settings) -> FeedbackStore:
        """The store the configuration chooses: `<data_dir>/feedback`, or the database URL when one is set."""
        return cls(Path(settings.data_dir) / "feedback", settings.feedback.database_url)

    def record(self, feedback: FeedbackRequest, cached: CachedRequest) -> FeedbackReceipt:
        """Store the verdict with the request's model version, input hash, de-identified input and, for a
        segmentation, the reviewed mask (in the input's geometry, with its affine)."""
        mask = None
        if _is_segmentation(cached):
            mask = _reviewed_mask(feedback, cached)
        else:
            _checked_label(feedback, cached)
        name, npz = _npz({key: cached.arrays[key] for key in ("tensor", "affine") if key in cached.arrays})
        with self.engine.begin() as connection:
            self.inputs.save(connection, name, npz)
            inserted = connection.execute(insert(feedback_records).values(
                created_at=datetime.now(UTC), request_id=cached.request_id, model_id=cached.model_id,
                model_version=cached.model_version, input_sha256=cached.input_sha256,
                predicted=cached.facts.get("predicted_class"), verdict=feedback.verdict,
                corrected_label=feedback.corrected_label, reviewer_id=feedback.reviewer_id,
                comment=feedback.comment, input_file=name,
            ))
            if mask is not None:
                mask_name, mask_npz = _npz({"mask": mask, "affine": cached.arrays["input_affine"]})
                self.inputs.save(connection, mask_name, mask_npz)
                connection.execute(insert(feedback_masks).values(feedback_id=inserted.inserted_primary_key[0],
                                                                 mask_file=mask_name))
        return FeedbackReceipt(feedback_id=inserted.inserted_primary_key[0], request_id=cached.request_id,
                               model_id=cached.model_id, model_version=cached.model_version,
                               input_sha256=cached.input_sha256, verdict=feedback.verdict)

    def labelled_inputs(self, model_id: str) -> list[tuple[np.ndarray, str]]:
        """(input tensor, reviewed label) of every accepted or corrected record: the fine-tuning set."""
        columns = feedback_records.c
        query = (select(columns.input_file, func.coalesce(columns.corrected_label, columns.predicted))
                 .where(columns.model_id == model_id, columns.verdict.in_(("accept", "correct")))
                 .order_by(columns.id))
        out = []
        with self.engine.connect() as connection:
            for name, label in connection.execute(query):
                out.append((self._arrays(connection, name)["tensor"], label))
        return out

    def labelled_volumes(self, model_id: str) -> Iterator[LabelledVolume]:
        """Every accepted or corrected segmentation of `model_id`, the reviewed mask resampled (nearest) onto its
        input's model grid: the fine-tuning set, loaded one volume at a time (each is tens of MB)."""
        records, masks = feedback_records.c, feedback_masks.c
        query = (select(records.input_file, masks.mask_file).join(feedback_masks, masks.feedback_id == records.id)
                 .where(records.model_id == model_id).order_by(records.id))
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        for input_file, mask_file in rows:
            with self.engine.connect() as connection:
                model_input, reviewed = self._arrays(connection, input_file), self._arrays(connection, mask_file)
            tensor, affine = model_input["tensor"].astype(np.float32), model_input["affine"]
            from preprocessing.volumes import resample_to_grid  # fine-tuning only: torch stays out of the API workers

            labels = resample_to_grid(reviewed["mask"][None], reviewed["affine"], affine, tensor.shape[1:], "nearest")[0]
            yield LabelledVolume(tensor=tensor, labels=labels.round().astype(np.uint8), affine=affine)

    def _arrays(self, connection: Connection, name: str) -> dict[str, np.ndarray]:
        with np.load(io.BytesIO(self.inputs.load(connection, name))) as stored:
            return {key: stored[key] for key in stored.files}
