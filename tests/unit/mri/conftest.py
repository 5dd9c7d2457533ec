"""MRI test fixtures: the demo segmenter in the test store (trained once, minutes on a clean clone)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def mri_model_tag() -> str:
    """The stored demo MRI model (trains it when the test store lacks it)."""
    from core import store
    from training_export.demo import ensure_demo_models

    ensure_demo_models(["neuronova-mri"])
    return str(store.get_model("neuronova-mri:latest").tag)
