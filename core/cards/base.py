"""What every model card says, whatever the task: identity, file, provenance, metrics, intended use."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

DEMO_INTENDED_USE = "demo, not for clinical use"


class Provenance(BaseModel):
    """Where a model and its training data came from."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="who trained or supplied the model")
    licence: str = "unspecified"
    training_date: str | None = Field(default=None, description="ISO date of training")
    data_description: str = ""
    synthetic_data: bool = Field(description="true when trained on generated, not patient, data")


class CardBase(BaseModel):
    """Fields shared by every task's card. A card is stored as the `card` entry of the model's store metadata."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    card_version: int = 1
    name: str = Field(description="human-readable model name")
    format: str = Field(default="onnx", description="serving file format")
    model_file: str = "model.onnx"
    intended_use: str
    provenance: Provenance
    metrics: dict[str, float] = Field(default_factory=dict, description="held-out metrics from training or import")
