"""Distributed mode's shared facts against a real PostgreSQL: the active-model registry, uploaded exports imported
by a replica that lacks them, one rate limit across replicas, and the feedback store on the replicas' database with
its inputs on the shared volume."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import numpy as np
import pytest
from sqlalchemy import text

from pipelines.feedback import FeedbackRequest, record_feedback
from api.limits import SharedWindows
from state.request_cache import CachedRequest, cache_directory
from core import store
from state import active_models, model_exports, shared_db
from core.cards import DEMO_INTENDED_USE, ClassificationCard, Provenance
from core.errors import ModelNotLoaded
from state.feedback import FeedbackStore, InputFiles
from core.settings import get_settings

NAME = "unit-shared-export"


@pytest.fixture()
def distributed(postgres_server, tmp_path, monkeypatch) -> str:
    """Settings of one replica in distributed mode: a fresh database, a shared dir; its URL."""
    url = postgres_server.new_database()
    monkeypatch.setenv("NEURONOVA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("NEURONOVA_DISTRIBUTED__DATABASE_URL", url)
    monkeypatch.setenv("NEURONOVA_DISTRIBUTED__SHARED_DIR", str(tmp_path / "volume"))
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()


def test_registry_switches_rollback_and_stamp_in_postgres(distributed):
    assert active_models.active_tag("ct", "neuronova-ct:latest") == "neuronova-ct:latest"
    assert active_models.previous_tag("ct") is None and active_models.registry_stamp() == 0
    active_models.record_switch("ct", "neuronova-ct:v2", "neuronova-ct:v1")
    first = active_models.registry_stamp()
    assert active_models.active_tag("ct", "x") == "neuronova-ct:v2" and active_models.previous_tag("ct") == "neuronova-ct:v1"
    active_models.record_switch("ct", "neuronova-ct:v1", "neuronova-ct:v2")  # rollback
    assert active_models.active_tag("ct", "x") == "neuronova-ct:v1" and active_models.previous_tag("ct") == "neuronova-ct:v2"
    assert active_models.registry_stamp() > first > 0
    assert not active_models.registry_path().exists()  # nothing local


def test_concurrent_switches_keep_every_history_entry(distributed):
    def switch(index: int) -> None:
        active_models.record_switch("mri", f"m:new{index}", f"m:old{index}")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(switch, range(8)))
    assert active_models.registry_stamp() == 8
    with shared_db.engine().connect() as connection:
        history = connection.execute(text("SELECT history FROM neuronova_active_models WHERE model_id = 'mri'")).scalar_one()
    assert sorted(h["tag"] for h in history) == [f"m:old{i}" for i in range(8)]  # row lock: no switch lost


@pytest.fixture()
def exported(distributed, tmp_path) -> tuple[str, Path]:
    """A model saved, exported to a file and deleted from the store again: a tag only an upload elsewhere brought."""
    card = ClassificationCard(name="export test", intended_use=DEMO_INTENDED_USE, labels=["Glioma", "No Tumor"],
                              provenance=Provenance(source="unit test", synthetic_data=True))
    tag = store.save_model(NAME, card, {"model.onnx": b"not used"})
    path = tmp_path / "upload.bentomodel"
    bentoml.models.export_model(tag, str(path))
    store.delete_model(tag)
    yield tag, path
    if store.has_version(tag):
        store.delete_model(tag)


def test_a_replica_imports_an_export_another_published(exported):
    tag, path = exported
    with pytest.raises(ModelNotLoaded):
        model_exports.local_model(tag)  # not published yet: nowhere to get it from
    digest = model_exports.file_sha256(path)
    model_exports.publish(path, digest, tag)
    model_exports.publish(path, digest, tag)  # a second upload of the same file changes nothing
    shared = model_exports.exports_dir()
    assert [p.name for p in shared.iterdir()] == [f"{digest}.bentomodel"]
    assert str(model_exports.local_model(tag).tag) == tag  # imported into this store
    assert str(model_exports.local_model(tag).tag) == tag  # now local


def test_a_corrupt_shared_export_is_refused(exported):
    tag, path = exported
    digest = model_exports.file_sha256(path)
    model_exports.publish(path, digest, tag)
    (model_exports.exports_dir() / f"{digest}.bentomodel").write_bytes(b"truncated")
    with pytest.raises(ModelNotLoaded, match="does not match"):
        model_exports.local_model(tag)


def test_one_rate_limit_across_replicas(distributed):
    replicas = [SharedWindows(distributed), SharedWindows(distributed)]

    async def hits() -> list[int | None]:
        return [await replicas[i % 2].admit("dr_1 /predict/ct_classification", 3) for i in range(5)]

    results = asyncio.run(hits())
    assert results[:3] == [None, None, None]
    assert all(1 <= wait <= 60 for wait in results[3:])
    other = asyncio.run(replicas[1].admit("dr_2 /predict/ct_classification", 3))
    assert other is None  # another client has its own budget


def test_old_rate_windows_are_deleted(distributed):
    windows = SharedWindows(distributed)
    asyncio.run(windows.admit("a /x", 5))
    with shared_db.engine(distributed).begin() as connection:
        connection.execute(text("INSERT INTO neuronova_rate_limits VALUES ('old /x', 0, 3)"))
    windows._swept_window = 0  # as a worker that has not swept this minute yet
    asyncio.run(windows.admit("a /x", 5))
    with shared_db.engine(distributed).connect() as connection:
        buckets = connection.execute(text("SELECT bucket FROM neuronova_rate_limits")).scalars().all()
    assert buckets == ["a /x"]


def test_rate_limit_fails_open_without_the_database():
    windows = SharedWindows("postgresql://nobody@127.0.0.1:1/none")
    assert asyncio.run(windows.admit("a /x", 1)) is None


def test_request_cache_and_feedback_live_on_the_shared_volume(distributed, tmp_path):
    settings = get_settings()
    assert cache_directory(settings) == tmp_path / "volume" / "request_cache"
    feedback = FeedbackStore.from_settings(settings)
    assert feedback.engine.dialect.name == "postgresql"
    assert isinstance(feedback.inputs, InputFiles) and feedback.inputs.directory == tmp_path / "volume" / "feedback" / "inputs"
    cached = CachedRequest(request_id="r1", model_id="ct_classification", model_version="neuronova-ct:v1",
                           input_sha256="ab" * 32, arrays={"tensor": np.ones((1, 4, 4), np.float32)},
                           facts={"labels": ["Glioma", "No Tumor"], "predicted_class": "Glioma"})
    record_feedback(feedback, FeedbackRequest(request_id="r1", verdict="accept", reviewer_id="dr_7"), cached)
    other_replica = FeedbackStore.from_settings(settings)
    assert [label for _, label in other_replica.labelled_inputs("ct_classification")] == ["Glioma"]
    assert len(list(feedback.inputs.directory.glob("*.npz"))) == 1
