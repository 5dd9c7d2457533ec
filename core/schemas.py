"""Response models: SPEC.md's response shapes, written once. Every route returns one of these (or the error body)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ImportantRegion(BaseModel):
    """A box (input-image pixels) around one connected hot area of a heatmap."""

    x: int
    y: int
    width: int
    height: int
    importance: float = Field(description="mean normalised heatmap value inside the area")


class HeatmapExplanation(BaseModel):
    """A saliency map as PNG data URLs in the input image's pixel geometry, plus its hottest regions."""

    method: str = Field(description="what made the map: grad_cam, or a model-agnostic method")
    target_class: str
    layer_name: str | None = None
    colormap: str = "jet"
    heatmap_base64: str
    overlay_base64: str
    important_regions: list[ImportantRegion]


class ClassProbabilities(BaseModel):
    predicted_class: str
    confidence: float
    probabilities: dict[str, float]


class InputDescription(BaseModel):
    """What the service understood the input to be (no patient identifiers)."""

    format: str
    modality: str | None = None
    transfer_syntax: str | None = None
    photometric: str | None = None
    rows: int
    columns: int
    pixel_spacing_mm: tuple[float, float] | None = None
    sha256: str


class ResponseMetadata(BaseModel):
    timestamp: str
    processing_node: str
    input: InputDescription | None = None
    request_metadata: dict[str, Any] = Field(default_factory=dict, description="the caller's metadata, echoed")


class PredictionResponse(BaseModel):
    """The envelope every prediction route answers with."""

    success: Literal[True] = True
    request_id: str
    model_id: str
    model_version: str
    intended_use: str
    inference_time_ms: float
    warnings: list[str] = Field(default_factory=list)
    metadata: ResponseMetadata


class CTClassificationResponse(PredictionResponse):
    result: ClassProbabilities
    xai: dict[str, HeatmapExplanation] | None = None


class ModelStatus(BaseModel):
    loaded: bool
    version: str | None
    last_updated: str | None
    engine: str | None = None
    error: str | None = None


class HealthResponse(BaseModel):
    status: Literal["healthy", "degraded"]
    version: str
    models: dict[str, ModelStatus]
    gpu_available: bool
    gpu_devices: list[str]
    memory_usage_mb: float
    uptime_seconds: float


class ModelInfo(BaseModel):
    model_id: str
    name: str
    version: str
    type: str
    input_format: list[str]
    output_classes: list[str] | dict[str, list[str]]
    metrics: dict[str, float]
    training_date: str | None
    model_size_mb: float
    avg_inference_time_ms: float | None
    xai_supported: list[str]
    intended_use: str
    card: dict[str, Any] = Field(description="the full model card from the store")


class ModelInfoResponse(BaseModel):
    models: list[ModelInfo]
