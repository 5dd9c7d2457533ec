"""The shared registry of active model tags: switches, history, rollback target."""

import pytest

from state import active_models
from core.settings import get_settings


@pytest.fixture()
def registry(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONOVA_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    yield tmp_path / "active_models.json"
    get_settings.cache_clear()


def test_default_until_switched_then_history(registry):
    assert active_models.active_tag("ct", "neuronova-ct:latest") == "neuronova-ct:latest"
    assert active_models.previous_tag("ct") is None and active_models.registry_stamp() == 0.0
    active_models.record_switch("ct", "neuronova-ct:v2", "neuronova-ct:v1")
    assert active_models.active_tag("ct", "x") == "neuronova-ct:v2"
    assert active_models.previous_tag("ct") == "neuronova-ct:v1"
    active_models.record_switch("ct", "neuronova-ct:v1", "neuronova-ct:v2")  # rollback
    assert active_models.active_tag("ct", "x") == "neuronova-ct:v1"
    assert active_models.previous_tag("ct") == "neuronova-ct:v2"
    assert active_models.registry_stamp() > 0


def test_corrupt_registry_falls_back_to_default(registry):
    registry.write_text("{not json")
    assert active_models.active_tag("ct", "neuronova-ct:latest") == "neuronova-ct:latest"
