"""Admin list of predictions, filterable by status (the review queue)."""

from __future__ import annotations

from django.contrib import admin

from neuronova_client.models import Prediction


@admin.register(Prediction)
class PredictionAdmin(admin.ModelAdmin):
    list_display = ("request_id", "model_id", "model_version", "patient_id", "status", "created")
    list_filter = ("status", "model_id", "verdict")
    search_fields = ("request_id", "patient_id", "task_id")
    readonly_fields = ("result", "error", "created", "updated", "feedback_id", "feedback_receipt")
