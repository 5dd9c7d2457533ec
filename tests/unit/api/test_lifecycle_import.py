"""An uploaded export is staged, checked, then published: one whose card is not a card of the slot's model leaves
nothing in the model store and nothing on the volume the replicas share."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import bentoml
import pytest

from pipelines import lifecycle
from core.cards.classification import ClassificationCard
from core.errors import InvalidRequest
from core.settings import LimitSettings


@pytest.fixture
def cardless_export(tmp_path: Path) -> tuple[Path, str]:
    """An export of a model that has no NeuroNova card, and its tag (no longer in the store)."""
    with bentoml.models.create("neuronova-test-cardless") as model:
        Path(model.path_of("weights.bin")).write_bytes(b"\0" * 64)
    tag = str(model.tag)
    path = tmp_path / "cardless.bentomodel"
    bentoml.models.export_model(tag, str(path))
    bentoml.models.delete(tag)
    return path, tag


def test_an_upload_that_fails_its_card_check_leaves_the_store_unchanged(cardless_export, monkeypatch) -> None:
    path, tag = cardless_export
    published = []
    monkeypatch.setattr(lifecycle.model_exports, "publish", lambda *args: published.append(args))
    slot = SimpleNamespace(model_id="ct_classification", card_type=ClassificationCard)
    with pytest.raises(InvalidRequest, match="not a ct_classification model"):
        lifecycle.import_export_file(path, hashlib.sha256(path.read_bytes()).hexdigest(), LimitSettings(), slot)
    with pytest.raises(bentoml.exceptions.NotFound):
        bentoml.models.get(tag)
    assert published == []
