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


@pytest.fixture
def private_temp_dir(tmp_path, monkeypatch):
    """The system temp folder of this process, made private: `temp_dir_entries()` then sees only what the code under
    test writes there, not what other processes on the machine (servers, other test runs) write to /tmp meanwhile."""
    import tempfile

    folder = tmp_path / "system-temp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder
