"""What every model card says, whatever the task: identity, file, provenance, metrics, intended use."""

from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

DEMO_INTENDED_USE = "demo, not for clinical use"


def inside_model_folder(name: str) -> str:
    """A file a card names must be a plain relative path inside the model's own folder: no `..`, no absolute or
    drive path, no backslash (the serving side joins it to that folder)."""
    path = PurePosixPath(name)
    if name and ("\\" in name or path.is_absolute() or PureWindowsPath(name).drive or ".." in path.parts):
        raise ValueError(f"{name!r} must be a relative path inside the model folder")
    return name


ModelFileName = Annotated[str, AfterValidator(inside_model_folder)]
"""A file name in a model card, confined to the model's folder."""


class Provenance(BaseModel):
    """Where a model and its training data came from."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="who trained or supplied the model")
    licence: str = "unspecified"
    training_date: str | None = Field(default=None, description="ISO date of training")
    data_description: str = ""
    synthetic_data: bool = Field(description="true when trained on generated, not patient, data")


class Lineage(BaseModel):
    """How a model was derived from a stored parent, and the comparison that let it into the store."""

    model_config = ConfigDict(extra="forbid")

    parent_tag: str = Field(description="store tag of the model this one was fine-tuned from")
    method: str
    feedback_records: int = Field(ge=0, description="reviewed feedback records used for training")
    evaluation: dict[str, dict[str, float]] = Field(
        description="evaluation set -> metrics, e.g. {'reference/parent': {...}, 'reference/candidate': {...}}"
    )
    non_inferiority_margin: float = Field(ge=0, description="accuracy the child could lose and still be registered")


class CardBase(BaseModel):
    """Fields shared by every task's card. A card is stored as the `card` entry of the model's store metadata."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    card_version: int = 1
    name: str = Field(description="human-readable model name")
    format: str = Field(default="onnx", description="serving file format")
    model_file: ModelFileName = "model.onnx"
    intended_use: str
    provenance: Provenance
    metrics: dict[str, float] = Field(default_factory=dict, description="held-out metrics from training or import")
    lineage: Lineage | None = Field(default=None, description="set on versions fine-tuned from a parent")
