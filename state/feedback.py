"""The feedback store: doctors' verdicts on results, durable, for `training_export` to build fine-tuning sets.

The API (`pipelines/feedback.py`) validates a verdict against the request it reviews and hands over a `FeedbackEntry`;
fine-tuning reads the labelled inputs back. Embedded default: SQLite in the data dir, each reviewed request's
de-identified model input (pixels only) and reviewed mask an .npz file beside it. Production: PostgreSQL by URL
(`feedback.database_url`), inputs and masks stored in the database with the record, so every API host and the
fine-tuning job need nothing but the URL. Replicas without a feedback URL of their own: the replicas' PostgreSQL
(`distributed.database_url`), inputs and masks as write-once files on the shared volume (the fine-tuning job mounts
it too).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import numpy as np
from sqlalchemy import Connection, func, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from state.feedback_db import (
    default_database_url,
    feedback_inputs,
    feedback_masks,
    feedback_records,
    open_engine,
)
from core.settings import Settings
from core.volumes import resample_to_grid


@dataclass(frozen=True)
class FeedbackEntry:
    """One validated verdict with what the reviewed request saw: its model input arrays (`tensor`, and `affine` for a
    volume) and, for a segmentation, the reviewed mask in the input's geometry (`mask_affine`)."""

    request_id: str
    model_id: str
    model_version: str
    input_sha256: str
    predicted: str | None
    verdict: str
    corrected_label: str | None
    reviewer_id: str
    comment: str
    arrays: dict[str, np.ndarray]
    mask: np.ndarray | None = None
    mask_affine: np.ndarray | None = None


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


class FeedbackStore:
    """Append-only feedback records in SQL (SQLite file in `directory` unless `database_url` names another)."""

    def __init__(self, directory: Path, database_url: str | None = None, inputs_dir: Path | None = None) -> None:
        if not database_url:
            directory.mkdir(parents=True, exist_ok=True)
        self.engine = open_engine(database_url or default_database_url(directory))
        if inputs_dir is None and self.engine.dialect.name == "sqlite":
            inputs_dir = directory / "inputs"
        self.inputs: InputStore = InputFiles(inputs_dir) if inputs_dir is not None else InputRows()

    @classmethod
    def from_settings(cls, settings: Settings) -> FeedbackStore:
        """The store the configuration chooses: `<data_dir>/feedback`, or the database URL when one is set. With
        replicas and no feedback URL of its own: the replicas' database, inputs as write-once files on the shared
        volume (`<shared_dir>/feedback/inputs`, named by their content's hash)."""
        distributed = settings.distributed
        if not settings.feedback.database_url and distributed.enabled:
            return cls(Path(settings.data_dir) / "feedback", distributed.database_url,
                       Path(distributed.shared_dir or settings.data_dir) / "feedback" / "inputs")
        return cls(Path(settings.data_dir) / "feedback", settings.feedback.database_url)

    def record(self, entry: FeedbackEntry) -> int:
        """Store the verdict with the request's model version, input hash, de-identified input and, for a
        segmentation, the reviewed mask (in the input's geometry, with its affine); return the feedback id."""
        name, npz = _npz({key: entry.arrays[key] for key in ("tensor", "affine") if key in entry.arrays})
        with self.engine.begin() as connection:
            self.inputs.save(connection, name, npz)
            inserted = connection.execute(insert(feedback_records).values(
                created_at=datetime.now(UTC), request_id=entry.request_id, model_id=entry.model_id,
                model_version=entry.model_version, input_sha256=entry.input_sha256, predicted=entry.predicted,
                verdict=entry.verdict, corrected_label=entry.corrected_label, reviewer_id=entry.reviewer_id,
                comment=entry.comment, input_file=name,
            ))
            feedback_id = int(inserted.inserted_primary_key[0])
            if entry.mask is not None:
                mask_name, mask_npz = _npz({"mask": entry.mask, "affine": entry.mask_affine})
                self.inputs.save(connection, mask_name, mask_npz)
                connection.execute(insert(feedback_masks).values(feedback_id=feedback_id, mask_file=mask_name))
        return feedback_id

    def verdict_counts(self, model_id: str, model_version: str) -> dict[str, int]:
        """How many verdicts of each kind clinicians gave this model version."""
        columns = feedback_records.c
        query = (select(columns.verdict, func.count()).where(columns.model_id == model_id,
                                                             columns.model_version == model_version)
                 .group_by(columns.verdict))
        with self.engine.connect() as connection:
            return {verdict: int(count) for verdict, count in connection.execute(query)}

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
            labels = resample_to_grid(reviewed["mask"][None], reviewed["affine"], affine, tensor.shape[1:], "nearest")[0]
            yield LabelledVolume(tensor=tensor, labels=labels.round().astype(np.uint8), affine=affine)

    def _arrays(self, connection: Connection, name: str) -> dict[str, np.ndarray]:
        with np.load(io.BytesIO(self.inputs.load(connection, name))) as stored:
            return {key: stored[key] for key in stored.files}
