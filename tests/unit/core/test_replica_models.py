"""What each replica serves, in the shared PostgreSQL: a runner writes its row as it polls, a replica that stopped
writing ages out, and a switch's answer waits for every live replica to take the version or fail to."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from sqlalchemy import text

from pipelines import lifecycle
from core import store
from state import replica_models
from state import active_models, shared_db
from core.cards import DEMO_INTENDED_USE, ClassificationCard, Provenance
from state.replica_models import ReplicaModel
from core.settings import get_settings
from runners import switching
from runners.switching import SwitchableModel

MODEL = "ct_classification"
EVENT_TIMEOUT_S = 30.0


@pytest.fixture()
def distributed(postgres_server, tmp_path, monkeypatch) -> str:
    """One replica (`here`) in distributed mode on a fresh database."""
    monkeypatch.setenv("NEURONOVA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("NEURONOVA_DISTRIBUTED__DATABASE_URL", postgres_server.new_database())
    monkeypatch.setenv("NEURONOVA_DISTRIBUTED__SHARED_DIR", str(tmp_path / "volume"))
    monkeypatch.setenv("NEURONOVA_DISTRIBUTED__REPLICA_ID", "here")
    get_settings.cache_clear()
    yield "here"
    get_settings.cache_clear()


def serving(replica: str, tag: str | None, pending: str | None = None, error: str | None = None) -> ReplicaModel:
    return ReplicaModel(replica=replica, tag=tag, generation=1, pending=pending, error=error)


def wait_for(condition: Callable[[], bool]) -> None:
    """Until `condition` holds (an event another thread brings about), failing after EVENT_TIMEOUT_S."""
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, "the awaited state never came"
        time.sleep(0.05)


def test_live_replicas_are_those_that_wrote_recently(distributed) -> None:
    replica_models.report(MODEL, serving("a", "ct:v1"))
    replica_models.report(MODEL, serving("b", "ct:v1"))
    replica_models.report(MODEL, serving("b", "ct:v2"))  # a refresh replaces the row
    replica_models.report("mri_segmentation", serving("a", "mri:v1"))
    assert [(r.replica, r.tag) for r in replica_models.live(MODEL)] == [("a", "ct:v1"), ("b", "ct:v2")]

    with shared_db.engine().begin() as connection:
        connection.execute(text("UPDATE neuronova_replica_models SET updated_at = now() - interval '1 minute' "
                                "WHERE replica_id = 'b'"))
    assert [r.replica for r in replica_models.live(MODEL)] == ["a"]


def test_settled_waits_until_every_live_replica_took_the_version_or_failed_to(distributed) -> None:
    replica_models.report(MODEL, serving("a", "ct:v1"))
    replica_models.report(MODEL, serving("b", "ct:v1"))
    assert [r.tag for r in replica_models.settled(MODEL, "ct:v2", 0.0)] == ["ct:v1", "ct:v1"]  # as they are

    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(replica_models.settled, MODEL, "ct:v2", EVENT_TIMEOUT_S)
        replica_models.report(MODEL, serving("a", "ct:v2"))
        replica_models.report(MODEL, serving("b", "ct:v1", pending="ct:v2"))  # trying, no failure yet
        assert not answer.done()  # b is still trying
        replica_models.report(MODEL, serving("b", "ct:v1", pending="ct:v2", error="MemoryError: no room"))
        replicas = answer.result(timeout=EVENT_TIMEOUT_S)

    assert replicas == [serving("a", "ct:v2"),
                        serving("b", "ct:v1", pending="ct:v2", error="MemoryError: no room")]


def test_update_model_lists_each_replica_and_whether_it_switched(distributed) -> None:
    replica_models.report(MODEL, serving("here", "ct:v2"))
    replica_models.report(MODEL, serving("there", "ct:v1", pending="ct:v2", error="ModelNotLoaded: not in store"))
    switches = asyncio.run(lifecycle.replica_switches(MODEL, "ct:v2", {}, 0.0))

    assert [(s.replica, s.version, s.switched, s.switch_pending, s.error) for s in switches] == [
        ("here", "ct:v2", True, None, None),
        ("there", "ct:v1", False, "ct:v2", "ModelNotLoaded: not in store")]


def test_a_runner_writes_what_it_serves_as_it_polls(distributed, monkeypatch) -> None:
    """A switch this replica cannot load yet is in its row (pending, with the error) until a retry loads it."""
    card = ClassificationCard(name="replica test", intended_use=DEMO_INTENDED_USE, labels=["Glioma", "No Tumor"],
                              provenance=Provenance(source="unit test", synthetic_data=True))
    v1, v2 = (store.save_model("unit-replica-model", card, {"model.onnx": b"not used"}) for _ in range(2))
    refusing = [True]

    def load(model):
        if str(model.tag) == v2 and refusing[0]:
            raise MemoryError("no room")
        return SimpleNamespace(tag=str(model.tag), card=None, loaded_at="now")

    monkeypatch.setattr(switching, "WATCH_INTERVAL_S", 0.05)
    monkeypatch.setattr(switching, "RETRY_FIRST_S", 0.05)
    try:
        SwitchableModel(MODEL, v1, lambda: store.get_model(v1), load)
        wait_for(lambda: [r.tag for r in replica_models.live(MODEL)] == [v1])

        active_models.record_switch(MODEL, v2, v1)
        wait_for(lambda: replica_models.live(MODEL)[0].pending == v2)
        row = replica_models.live(MODEL)[0]
        assert (row.replica, row.tag, row.pending) == ("here", v1, v2) and "no room" in row.error

        refusing[0] = False
        wait_for(lambda: replica_models.live(MODEL)[0].tag == v2)
        assert replica_models.live(MODEL) == [ReplicaModel("here", v2, 2, None, None)]
    finally:
        for tag in (v1, v2):
            store.delete_model(tag)


def test_embedded_lists_this_server_as_its_runner_describes_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NEURONOVA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("NEURONOVA_DISTRIBUTED__REPLICA_ID", "solo")
    get_settings.cache_clear()
    try:
        failed = asyncio.run(lifecycle.replica_switches(MODEL, "ct:v2", {
            "tag": "ct:v1", "generation": 1, "switch_pending": "ct:v2", "last_error": "MemoryError: no room"}, 0.0))
        switched = asyncio.run(lifecycle.replica_switches(MODEL, "ct:v2", {"tag": "ct:v2", "generation": 2}, 0.0))
    finally:
        get_settings.cache_clear()

    assert [s.model_dump() for s in failed] == [{"replica": "solo", "version": "ct:v1", "switched": False,
                                                 "switch_pending": "ct:v2", "error": "MemoryError: no room"}]
    assert [s.model_dump() for s in switched] == [{"replica": "solo", "version": "ct:v2", "switched": True,
                                                   "switch_pending": None, "error": None}]
