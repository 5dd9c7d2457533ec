"""The one module that talks to the BentoML model store: save a model with its card, resolve a tag, read a card."""

from __future__ import annotations

import importlib
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import bentoml
from bentoml.exceptions import NotFound as BentoNotFound

from core.cards.base import CardBase
from core.errors import ModelNotLoaded

CARD_KEY = "card"
CardT = TypeVar("CardT", bound=CardBase)
LAZILY_CHECKED = ("pandas",)
"""Modules BentoML looks up in `sys.modules` without importing them whenever it reads a model's info (its metadata
validation asks `LazyType("pandas", "Series").isinstance`)."""


def settle_imports() -> None:
    """Wait until another thread has finished importing a module of LAZILY_CHECKED. An API worker imports the MRI
    pipeline in a thread on its first MRI task (monai imports pandas: seconds); a model read meanwhile found pandas
    half-initialised in `sys.modules`, BentoML's check raised AttributeError, and the request got a 500.
    `import_module` on a module being initialised blocks on its import lock until the other thread is done."""
    for name in LAZILY_CHECKED:
        module = sys.modules.get(name)
        if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False):
            importlib.import_module(name)


def save_model(name: str, card: CardBase, files: Mapping[str, Path | bytes], labels: dict[str, str] | None = None) -> str:
    """Store `files` (name -> path or bytes) under a new version of `name`, with the card as metadata; return the tag."""
    missing = {card.model_file} - set(files)
    if missing:
        raise ValueError(f"card names {sorted(missing)} but no such file was given")
    store_labels = {"task": getattr(card, "task", "unknown"), "synthetic": str(card.provenance.synthetic_data).lower()}
    store_labels.update(labels or {})
    metadata = {CARD_KEY: card.model_dump_json(), "intended_use": card.intended_use}
    settle_imports()
    with bentoml.models.create(name, labels=store_labels, metadata=metadata) as model:
        for file_name, content in files.items():
            target = Path(model.path_of(file_name))
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                shutil.copyfile(content, target)
    return str(model.tag)


def get_model(tag: str) -> bentoml.Model:
    """Resolve a tag (`name:version` or `name:latest`) to a stored model, or raise ModelNotLoaded."""
    settle_imports()
    try:
        return bentoml.models.get(tag)
    except (BentoNotFound, ValueError) as exc:
        raise ModelNotLoaded(f"model {tag!r} is not in the model store", {"tag": tag}) from exc


def read_card(model: bentoml.Model, card_type: type[CardT]) -> CardT:
    """Validate the stored card of `model` as `card_type` (stored as JSON text: store metadata cannot hold nulls)."""
    raw = model.info.metadata[CARD_KEY]
    return card_type.model_validate_json(raw) if isinstance(raw, str) else card_type.model_validate(raw)


def has_model(name: str) -> bool:
    """Whether at least one version of `name` is stored."""
    return bool(list_versions(name))


def has_version(tag: str) -> bool:
    """Whether the exact `name:version` is stored."""
    settle_imports()
    try:
        bentoml.models.get(tag)
    except (BentoNotFound, ValueError):
        return False
    return True


def list_versions(name: str) -> list[bentoml.Model]:
    """All stored versions of `name`, newest first (empty when there is none)."""
    settle_imports()
    try:
        models = bentoml.models.list(name)
    except BentoNotFound:
        return []
    return sorted(models, key=lambda m: m.creation_time, reverse=True)


def model_size_mb(model: bentoml.Model) -> float:
    """Size on disk of a stored model's files."""
    return sum(f.stat().st_size for f in Path(model.path).rglob("*") if f.is_file()) / 2**20


def import_model(path: Path) -> str:
    """Import an export file (`bentoml models export`) into the store; its tag."""
    settle_imports()
    return str(bentoml.models.import_model(str(path.resolve())).tag)


def delete_model(tag: str) -> None:
    """Remove one stored version."""
    settle_imports()
    bentoml.models.delete(tag)
