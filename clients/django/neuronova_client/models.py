"""AI results kept for doctor review."""

from __future__ import annotations

from typing import Any

from django.db import models
from django.utils import timezone


class Prediction(models.Model):
    """One result of the NeuroNova service: running (an MRI task), awaiting review, reviewed, or failed."""

    class Status(models.TextChoices):
        RUNNING = "running", "running on the service"
        PENDING = "pending", "awaiting review"
        REVIEWED = "reviewed", "reviewed"
        FAILED = "failed", "failed"

    request_id = models.CharField(max_length=128, unique=True)
    model_id = models.CharField(max_length=64)
    model_version = models.CharField(max_length=200, blank=True)
    patient_id = models.CharField(max_length=64, db_index=True, help_text="anonymised id, e.g. P123456")
    task_id = models.CharField(max_length=64, blank=True, db_index=True, help_text="the service's MRI task id")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    progress = models.PositiveSmallIntegerField(default=0)
    result = models.JSONField(null=True, blank=True, help_text="the service's whole answer")
    error = models.JSONField(null=True, blank=True, help_text="the service's SPEC error: code, message, details")
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)
    reviewed_by = models.CharField(max_length=150, blank=True)
    reviewed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-created",)

    def __str__(self) -> str:
        return f"{self.model_id} {self.request_id} ({self.status})"

    @classmethod
    def from_answer(cls, body: dict[str, Any], patient_id: str) -> Prediction:
        """Store a finished answer (CT, biomarker) as awaiting review."""
        return cls.objects.create(request_id=body["request_id"], model_id=body["model_id"],
                                  model_version=body["model_version"], patient_id=patient_id,
                                  status=cls.Status.PENDING, progress=100, result=body)

    def apply_task_status(self, polled: dict[str, Any]) -> None:
        """Take in a `GET /task/<id>` answer: finished tasks store their result or error, others their progress."""
        state = polled["status"]
        if state == "completed":
            self.result = polled["result"]
            self.model_version = str(self.result.get("model_version", ""))
            self.status = self.Status.PENDING
        elif state in ("failed", "cancelled"):
            self.error = polled.get("error") or {"code": "TASK_CANCELLED", "message": f"the task was {state}"}
            self.status = self.Status.FAILED
        self.progress = int(polled.get("progress") or 0)
        self.save()

    def fail(self, error: dict[str, Any]) -> None:
        self.error = error
        self.status = self.Status.FAILED
        self.save()

    def mark_reviewed(self, reviewer: str) -> None:
        """A doctor has looked at the result (the verdict itself goes to the service's `POST /feedback`)."""
        if self.status != self.Status.PENDING:
            raise ValueError(f"only a prediction awaiting review can be reviewed (this one is {self.status})")
        self.status = self.Status.REVIEWED
        self.reviewed_by = reviewer
        self.reviewed_at = timezone.now()
        self.save()

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.pk, "request_id": self.request_id, "model_id": self.model_id,
            "model_version": self.model_version, "patient_id": self.patient_id, "task_id": self.task_id,
            "status": self.status, "progress": self.progress, "result": self.result, "error": self.error,
            "created": self.created.isoformat(), "reviewed_by": self.reviewed_by,
            "reviewed_at": self.reviewed_at.isoformat() if self.reviewed_at else None,
        }
