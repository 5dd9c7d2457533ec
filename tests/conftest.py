"""Test session set-up: a private BentoML home holding the demo models, trained once and kept between runs."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("BENTOML_HOME", str(ROOT / ".bentoml-test"))
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_models() -> dict[str, str]:
    """Make sure every demo model is in the test store (trains the missing ones; minutes on a clean clone)."""
    from training_export.demo import ensure_demo_models

    return ensure_demo_models()


@pytest.fixture(scope="session")
def ct_model() -> str:
    """The demo CT classifier in the test store (trained on first use)."""
    from training_export.demo import ensure_demo_models

    return ensure_demo_models(["neuronova-ct"])["neuronova-ct"]
