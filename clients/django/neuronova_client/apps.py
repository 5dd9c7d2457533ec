"""The app's registration."""

from __future__ import annotations

from django.apps import AppConfig


class NeuroNovaClientConfig(AppConfig):
    name = "neuronova_client"
    verbose_name = "NeuroNova AI predictions"
    default_auto_field = "django.db.models.BigAutoField"
