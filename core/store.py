"""The one module that talks to the BentoML model store: save a model with its card, resolve a tag, read a card."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import bentoml
from bentoml.exceptions import NotFound as BentoNotFound

from core.cards.base import CardBase
from core.errors import ModelNotLoaded

CARD_KEY = "card"
CardT = TypeVar("CardT", bound=CardBase)


def save_model(name: str, card: CardBase, files: Mapping[str, Path | bytes], labels: dict[str, str] | None = None) -> str:
    """Store `files` (name -> path or bytes) under a new version of `name`, with the card as metadata; return the tag."""
    missing = {card.model_file} - set(files)
    if missing:
        raise ValueError(f"card names {sorted(missing)} but no such file was given")
    store_labels = {"task": getattr(card, "task", "unknown"), "synthetic": str(card.provenance.synthetic_data).lower()}
    store_labels.update(labels or {})
    metadata = {CARD_KEY: card.model_dump_json(), "intended_use": card.intended_use}
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
    try:
        bentoml.models.get(tag)
    except (BentoNotFound, ValueError):
        return False
    return True


def list_versions(name: str) -> list[bentoml.Model]:
    """All stored versions of `name`, newest first (empty when there is none)."""
    try:
        models = bentoml.models.list(name)
    except BentoNotFound:
        return []
    return sorted(models, key=lambda m: m.creation_time, reverse=True)


def model_size_mb(model: bentoml.Model) -> float:
    """Size on disk of a stored model's files."""
    return sum(f.stat().st_size for f in Path(model.path).rglob("*") if f.is_file()) / 2**20


def delete_model(tag: str) -> None:
    """Remove one stored version."""
    bentoml.models.delete(tag)
