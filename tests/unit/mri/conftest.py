"""MRI test fixtures: the demo segmenter in the test store (imported from demo_models/ when it lacks it)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def mri_model_tag() -> str:
    """The stored demo MRI model (imported from demo_models/ when the test store lacks it)."""
    from core import store
    from training_export.demo import ensure_demo_models

    ensure_demo_models(["neuronova-mri"])
    return str(store.get_model("neuronova-mri:latest").tag)
