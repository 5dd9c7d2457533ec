"""A runner's served model follows the registry: switch, rollback, and a failed load keeps the old model."""

from types import SimpleNamespace

import pytest

from core import store

from state import active_models
from core.cards import DEMO_INTENDED_USE, ClassificationCard, Provenance
from core.errors import ModelNotLoaded
from core.settings import get_settings
from runners import switching
from runners.switching import SwitchableModel

NAME = "unit-switch-model"


@pytest.fixture()
def versions(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONOVA_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    card = ClassificationCard(name="switch test", intended_use=DEMO_INTENDED_USE, labels=["Glioma", "No Tumor"],
                              provenance=Provenance(source="unit test", synthetic_data=True))
    tags = [store.save_model(NAME, card, {"model.onnx": b"not used"}) for _ in range(2)]
    yield tags
    for tag in tags:
        store.delete_model(tag)
    get_settings.cache_clear()


def loaded(model):
    return SimpleNamespace(tag=str(model.tag), card=None, loaded_at="now")


def make(default_tag: str, loader=loaded) -> SwitchableModel:
    return SwitchableModel("unit", default_tag, lambda: store.get_model(default_tag), loader)


def test_switch_and_rollback(versions):
    v1, v2 = versions
    served = make(v1)
    assert (served.get()[0].tag, served.get()[1]) == (v1, 1)
    active_models.record_switch("unit", v2, v1)
    served.follow_registry()
    assert (served.get()[0].tag, served.get()[1]) == (v2, 2)
    served.follow_registry()  # nothing changed: no reload
    assert served.generation == 2
    active_models.record_switch("unit", v1, v2)
    served.follow_registry()
    assert (served.get()[0].tag, served.get()[1]) == (v1, 3)


def test_failed_load_keeps_the_old_model(versions):
    v1, v2 = versions
    served = make(v1, loader=lambda model: (_ for _ in ()).throw(RuntimeError("corrupt")) if str(model.tag) == v2 else loaded(model))
    active_models.record_switch("unit", v2, v1)
    served.follow_registry()
    assert (served.get()[0].tag, served.get()[1]) == (v1, 1) and "corrupt" in served.load_error
    active_models.record_switch("unit", f"{NAME}:doesnotexist", v1)
    served.follow_registry()
    assert (served.get()[0].tag, served.get()[1]) == (v1, 1) and "not in the model store" in served.load_error


def test_nothing_loaded_raises(versions):
    served = make(versions[0], loader=lambda model: (_ for _ in ()).throw(RuntimeError("broken")))
    with pytest.raises(ModelNotLoaded, match="broken"):
        served.get()
    assert served.describe() == {"loaded": False, "error": "RuntimeError: broken", "tag": versions[0]}


def test_a_failed_switch_is_reported_and_tried_again_with_backoff(versions, monkeypatch):
    """A replica that cannot load the version it was switched to (out of memory, say) keeps serving the old one,
    says so (`switch_pending`, the error), and takes the new one at a later try, each after a longer wait."""
    v1, v2 = versions
    refusals = ["MemoryError: no room", "MemoryError: still no room"]

    def flaky(model):
        if str(model.tag) == v2 and refusals:
            raise MemoryError(refusals.pop(0))
        return loaded(model)

    clock = [1000.0]
    monkeypatch.setattr(switching.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(switching, "WATCH_INTERVAL_S", 3600.0)  # the test alone follows the registry
    served = make(v1, loader=flaky)
    active_models.record_switch("unit", v2, v1)
    delays = []
    for _ in range(2):
        served.follow_registry()
        assert served.current.tag == v1 and served.pending == v2 and "no room" in served.load_error
        delays.append(served._retry_at - clock[0])
    assert delays == [switching.RETRY_FIRST_S, 2 * switching.RETRY_FIRST_S]
    served.follow_registry()
    assert served.current.tag == v2 and served.pending is None and served.load_error is None
