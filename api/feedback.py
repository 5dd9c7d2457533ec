"""Doctors' verdicts on results (human in the loop), stored durably for `training_export` to build fine-tuning sets.

Embedded default: SQLite in the data dir, with each reviewed request's de-identified model input (pixels only) beside it.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator

from api.request_cache import CachedRequest
from core.errors import InvalidRequest

SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,
    request_id TEXT NOT NULL,
    model_id TEXT NOT NULL,
    model_version TEXT NOT NULL,
    input_sha256 TEXT NOT NULL,
    predicted TEXT,
    verdict TEXT NOT NULL CHECK (verdict IN ('accept', 'correct', 'reject')),
    corrected_label TEXT,
    reviewer_id TEXT NOT NULL,
    comment TEXT NOT NULL DEFAULT '',
    input_file TEXT NOT NULL
)
"""


class FeedbackRequest(BaseModel):
    """A reviewer's verdict on an earlier result."""

    request_id: str = Field(min_length=1, max_length=128)
    verdict: Literal["accept", "correct", "reject"]
    corrected_label: str | None = Field(default=None, max_length=64)
    reviewer_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    comment: str = Field(default="", max_length=2000)

    @model_validator(mode="after")
    def _correction_has_label(self) -> "FeedbackRequest":
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


class FeedbackStore:
    """Append-only feedback records in SQLite, inputs as .npz files next to the database."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        (directory / "inputs").mkdir(parents=True, exist_ok=True)
        self.database = directory / "feedback.sqlite3"
        with self._connect() as connection:
            connection.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.database, timeout=30)
        connection.execute("PRAGMA journal_mode=WAL")
        return connection

    def record(self, feedback: FeedbackRequest, cached: CachedRequest) -> FeedbackReceipt:
        """Store the verdict with the request's model version, input hash and de-identified input."""
        labels = cached.facts.get("labels", [])
        if feedback.corrected_label is not None and feedback.corrected_label not in labels:
            raise InvalidRequest(f"corrected_label must be one of {labels}", {"corrected_label": feedback.corrected_label})
        input_file = self.directory / "inputs" / f"{cached.input_sha256}.npz"
        if not input_file.exists():
            np.savez_compressed(input_file, tensor=cached.arrays["tensor"])
        with self._connect() as connection:
            cursor = connection.execute(
                "INSERT INTO feedback (created_at, request_id, model_id, model_version, input_sha256, predicted, verdict,"
                " corrected_label, reviewer_id, comment, input_file) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (datetime.now(timezone.utc).isoformat(), cached.request_id, cached.model_id, cached.model_version,
                 cached.input_sha256, cached.facts.get("predicted_class"), feedback.verdict, feedback.corrected_label,
                 feedback.reviewer_id, feedback.comment, input_file.name),
            )
        return FeedbackReceipt(feedback_id=int(cursor.lastrowid), request_id=cached.request_id, model_id=cached.model_id,
                               model_version=cached.model_version, input_sha256=cached.input_sha256,
                               verdict=feedback.verdict)

    def labelled_inputs(self, model_id: str) -> list[tuple[np.ndarray, str]]:
        """(input tensor, reviewed label) of every accepted or corrected record: the fine-tuning set."""
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT input_file, COALESCE(corrected_label, predicted) FROM feedback"
                " WHERE model_id = ? AND verdict IN ('accept', 'correct') ORDER BY id", (model_id,),
            ).fetchall()
        out = []
        for input_file, label in rows:
            with np.load(self.directory / "inputs" / input_file) as stored:
                out.append((stored["tensor"], label))
        return out
