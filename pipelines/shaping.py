"""Response shaping shared by the routes: request ids, envelopes, class probabilities, heatmap explanations."""

from __future__ import annotations

import hashlib
import socket
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone

import numpy as np

from core.imaging import DecodedSlice
from core.schemas import ClassProbabilities, HeatmapExplanation, InputDescription, ResponseMetadata
from xai.regions import important_regions
from xai.render import DEFAULT_COLORMAP, colorize, overlay, png_data_url, to_source_geometry

PROCESSING_NODE = socket.gethostname()


def new_request_id(given: str | None) -> str:
    """The caller's request id, or a fresh one."""
    return given or f"req_{uuid.uuid4().hex}"


def elapsed_ms(started: float) -> float:
    """Milliseconds since a `time.perf_counter()` reading, rounded for the response."""
    return round((time.perf_counter() - started) * 1000.0, 2)


def response_metadata(input_description: InputDescription | None = None, request_metadata: dict | None = None) -> ResponseMetadata:
    return ResponseMetadata(
        timestamp=datetime.now(timezone.utc).isoformat(),
        processing_node=PROCESSING_NODE,
        input=input_description,
        request_metadata=request_metadata or {},
    )


def describe_slice(image: DecodedSlice, data: bytes) -> InputDescription:
    """What the service understood the upload to be, with the sha256 of its bytes (no identifiers)."""
    rows, columns = image.shape
    return InputDescription(
        format=image.source.format, modality=image.source.modality, transfer_syntax=image.source.transfer_syntax,
        photometric=image.source.photometric, rows=rows, columns=columns, pixel_spacing_mm=image.pixel_spacing_mm,
        sha256=hashlib.sha256(data).hexdigest(),
    )


def modality_warnings(image: DecodedSlice, modalities: Sequence[str]) -> list[str]:
    """A warning when the input's modality is accepted but is not the one the model was trained on (the card's first)."""
    trained = modalities[0] if modalities else None
    if image.source.modality and trained and image.source.modality != trained:
        return [f"input modality {image.source.modality} differs from the model's training modality {trained}"]
    return []


def class_probabilities(probabilities: np.ndarray, labels: Sequence[str]) -> ClassProbabilities:
    """Top class, its probability, and every class's probability (rounded to 6 places)."""
    top = int(np.argmax(probabilities))
    return ClassProbabilities(
        predicted_class=labels[top],
        confidence=round(float(probabilities[top]), 6),
        probabilities={label: round(float(p), 6) for label, p in zip(labels, probabilities)},
    )


def heatmap_explanation(
    heatmap: np.ndarray, display: np.ndarray, *, method: str, target_class: str, layer_name: str | None,
    colormap: str = DEFAULT_COLORMAP,
) -> HeatmapExplanation:
    """A model-resolution map rendered in the source image's geometry: heatmap, overlay, important regions."""
    in_source = to_source_geometry(heatmap, display.shape)
    return HeatmapExplanation(
        method=method, target_class=target_class, layer_name=layer_name, colormap=colormap,
        heatmap_base64=png_data_url(colorize(in_source, colormap)),
        overlay_base64=png_data_url(overlay(display, in_source, colormap)),
        important_regions=important_regions(in_source),
    )
