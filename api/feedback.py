"""Doctors' verdicts on results (human in the loop), stored durably for `training_export` to build fine-tuning sets.

Embedded default: SQLite in the data dir, each reviewed request's de-identified model input (pixels only) an .npz
file beside it. Production: PostgreSQL by URL (`feedback.database_url`), inputs stored in the database with the
record, so every API host and the fine-tuning job need nothing but the URL.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, Field, model_validator
from sqlalchemy import Connection, func, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from api.request_cache import CachedRequest
from core.errors import InvalidRequest
from core.feedback_db import (
    default_database_url,
    feedback_inputs,
    feedback_records,
    open_engine,
)


class FeedbackRequest(BaseModel):
    """A reviewer's verdict on an earlier result."""

    request_id: str = Field(min_length=1, max_length=128)
    verdict: Literal["accept", "correct", "reject"]
    corrected_label: str | None = Field(default=None, max_length=64)
    reviewer_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    comment: str = Field(default="", max_length=2000)

    @model_validator(mode="after")
    def _correction_has_label(self) -> FeedbackRequest:
        if self.verdict == "correct" and not self.corrected_label:
            raise ValueError("a 'correct' verdict needs corrected_label")
        return self


class FeedbackReceipt(BaseModel):
    success: bool = True
    feedback_id: int
    request_id: str
    model_id: str
    model_version: str
    input_sha256: str
    verdict: str


class InputStore(Protocol):
    """Where the de-identified inputs live, by content-addressed name (`<sha256 of the tensor>.npz`)."""

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


def _npz(tensor: np.ndarray) -> tuple[str, bytes]:
    """The tensor's content-addressed name (one input per distinct tensor, whichever model version made it) and bytes."""
    digest = hashlib.sha256(f"{tensor.dtype.str}{tensor.shape}".encode())
    digest.update(np.ascontiguousarray(tensor).tobytes())
    buffer = io.BytesIO()
    np.savez_compressed(buffer, tensor=tensor)
    return f"{digest.hexdigest()}.npz", buffer.getvalue()


class FeedbackStore:
    """Append-only feedback records in SQL (SQLite file in `directory` unless `database_url` names another)."""

    def __init__(self, directory: Path, database_url: str | None = None) -> None:
        if not database_url:
            directory.mkdir(parents=True, exist_ok=True)
        self.engine = open_engine(database_url or default_database_url(directory))
        self.inputs: InputStore = InputFiles(directory / "inputs") if self.engine.dialect.name == "sqlite" else InputRows()

    def record(self, feedback: FeedbackRequest, cached: CachedRequest) -> FeedbackReceipt:
        """Store the verdict with the request's model version, input hash and de-identified input."""
        labels = cached.facts.get("labels", [])
        if feedback.corrected_label is not None and feedback.corrected_label not in labels:
            raise InvalidRequest(f"corrected_label must be one of {labels}", {"corrected_label": feedback.corrected_label})
        name, npz = _npz(cached.arrays["tensor"])
        with self.engine.begin() as connection:
            self.inputs.save(connection, name, npz)
            inserted = connection.execute(insert(feedback_records).values(
                created_at=datetime.now(UTC), request_id=cached.request_id, model_id=cached.model_id,
                model_version=cached.model_version, input_sha256=cached.input_sha256,
                predicted=cached.facts.get("predicted_class"), verdict=feedback.verdict,
                corrected_label=feedback.corrected_label, reviewer_id=feedback.reviewer_id,
                comment=feedback.comment, input_file=name,
            ))
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
                with np.load(io.BytesIO(self.inputs.load(connection, name))) as stored:
                    out.append((stored["tensor"], label))
        return out
