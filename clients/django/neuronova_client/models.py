"""AI results kept for doctor review."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db import models
from django.utils import timezone


@dataclass(frozen=True)
class Review:
    """A doctor's verdict on a result, as the service's `POST /feedback` takes it."""

    verdict: str
    corrected_label: str | None = None
    comment: str = ""


class Prediction(models.Model):
    """One result of the NeuroNova service: running (an MRI task), awaiting review, reviewed, or failed."""

    class Status(models.TextChoices):
        RUNNING = "running", "running on the service"
        PENDING = "pending", "awaiting review"
        REVIEWED = "reviewed", "reviewed"
        FAILED = "failed", "failed"

    class Verdict(models.TextChoices):
        ACCEPT = "accept", "accept"
        CORRECT = "correct", "correct (with the right label)"
        REJECT = "reject", "reject"

    request_id = models.CharField(max_length=128, unique=True)
    model_id = models.CharField(max_length=64)
    model_version = models.CharField(max_length=200, blank=True)
    patient_id = models.CharField(max_length=64, db_index=True, help_text="anonymised id, e.g. P123456")
    task_id = models.CharField(max_length=64, blank=True, db_index=True, help_text="the service's MRI task id")
    submitted_by = models.CharField(max_length=150, blank=True,
                                    help_text="the token subject that submitted the task: the service shows a task "
                                              "to its submitter only, so the poller asks as this subject")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    progress = models.PositiveSmallIntegerField(default=0)
    result = models.JSONField(null=True, blank=True, help_text="the service's whole answer")
    error = models.JSONField(null=True, blank=True, help_text="the service's SPEC error: code, message, details")
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)
    reviewed_by = models.CharField(max_length=150, blank=True,
                                   help_text="the anonymised reviewer id sent to the service (no names)")
    reviewed_at = models.DateTimeField(null=True, blank=True)
    verdict = models.CharField(max_length=8, choices=Verdict.choices, blank=True)
    corrected_label = models.CharField(max_length=64, blank=True)
    review_comment = models.TextField(blank=True)
    feedback_id = models.PositiveBigIntegerField(null=True, blank=True, db_index=True,
                                                 help_text="the service's record of the verdict (POST /feedback)")
    feedback_receipt = models.JSONField(null=True, blank=True,
                                        help_text="the service's receipt: model version and input hash judged")

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

    def labels(self) -> list[str]:
        """The classes a correction may name: those of the answer's probabilities (the model's contract classes)."""
        probabilities = ((self.result or {}).get("result") or {}).get("probabilities")
        return list(probabilities) if isinstance(probabilities, dict) else []

    def ensure_reviewable(self) -> None:
        """Raise ValueError unless the result awaits review."""
        if self.status != self.Status.PENDING:
            raise ValueError(f"only a prediction awaiting review can be reviewed (this one is {self.status})")

    def mark_reviewed(self, review: Review, reviewer_id: str, receipt: dict[str, Any]) -> None:
        """The service has recorded the doctor's verdict (`receipt`, its `POST /feedback` answer): keep both."""
        self.ensure_reviewable()
        self.status = self.Status.REVIEWED
        self.verdict, self.corrected_label = review.verdict, review.corrected_label or ""
        self.review_comment = review.comment
        self.reviewed_by = reviewer_id
        self.reviewed_at = timezone.now()
        self.feedback_id = int(receipt["feedback_id"])
        self.feedback_receipt = {key: value for key, value in receipt.items() if key != "success"}
        self.save()

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.pk, "request_id": self.request_id, "model_id": self.model_id,
            "model_version": self.model_version, "patient_id": self.patient_id, "task_id": self.task_id,
            "status": self.status, "progress": self.progress, "result": self.result, "error": self.error,
            "created": self.created.isoformat(), "reviewed_by": self.reviewed_by,
            "reviewed_at": self.reviewed_at.isoformat() if self.reviewed_at else None, "verdict": self.verdict,
            "corrected_label": self.corrected_label, "review_comment": self.review_comment,
            "feedback_id": self.feedback_id, "feedback_receipt": self.feedback_receipt,
        }
