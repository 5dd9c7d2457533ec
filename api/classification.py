"""The CT classification pipeline on the API side: decode, prepare as the served model's card says, run, explain."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, Field

from api.models import ModelSlot, RunnerModel
from api.request_cache import CachedRequest
from api.shaping import heatmap_explanation
from core.cards.classification import ClassificationCard
from core.errors import InvalidRequest, ModelInferenceError, XaiGenerationError
from core.imaging import DecodedSlice
from core.schemas import CTClassificationResponse, ExplainResponse
from preprocessing.decode import decode_slice
from preprocessing.transforms import PreparedSlice, prepare_slice
from xai.render import DEFAULT_COLORMAP, colorize

ATTEMPTS = 2
"""A model switch between reading the card and running the batch costs one retry, never a failed request."""


@dataclass(frozen=True)
class Classified:
    """One slice's classification and the exact model version that produced it."""

    model: RunnerModel[ClassificationCard]
    decoded: DecodedSlice
    prepared: PreparedSlice
    probabilities: np.ndarray
    heatmap: np.ndarray | None


async def classify_slice(slot: ModelSlot[ClassificationCard], data: bytes, filename: str | None, *, explain: bool,
                         max_pixels: int) -> Classified:
    """Decode and prepare with the served model's card, predict (and Grad-CAM) in the batched runner.

    The runner tags each output row with its model generation; when that differs from the card used to prepare the
    input (a switch happened in between), the slice is prepared again with the new card.
    """
    for _ in range(ATTEMPTS):
        model = await slot.loaded()
        card = model.card
        decoded = decode_slice(data, filename, max_pixels=max_pixels, allow_multiframe=card.input.allow_multiframe,
                               modalities=card.input.modalities)
        prepared = prepare_slice(decoded, card.input)
        batch = prepared.tensor[None]
        calls = [slot.call("predict", batch)] + ([slot.call("explain", batch)] if explain else [])
        outputs = await asyncio.gather(*calls)
        probabilities, generation = outputs[0][0, :-1], int(outputs[0][0, -1])
        if generation == model.describe.get("generation"):
            return Classified(model, decoded, prepared, probabilities, outputs[1][0] if explain else None)
        slot.forget()
    raise ModelInferenceError("the CT model was switched repeatedly during the request; retry it")


class GradCamOptions(BaseModel):
    layer_name: str | None = Field(default=None, description="must be the card's Grad-CAM layer (the only one served)")
    colormap: str = DEFAULT_COLORMAP


class ExplainOptions(BaseModel):
    grad_cam: GradCamOptions = Field(default_factory=GradCamOptions)


def cached_classification(response: CTClassificationResponse, out: Classified) -> CachedRequest:
    """What `/xai/explain` and `/feedback` need of a CT prediction later: the prepared input, not the upload."""
    return CachedRequest(
        request_id=response.request_id, model_id=response.model_id, model_version=response.model_version,
        input_sha256=response.metadata.input.sha256 if response.metadata.input else "",
        arrays={"tensor": out.prepared.tensor, "display": (out.prepared.display * 255).round().astype(np.uint8)},
        facts={"labels": out.model.card.contract_labels(), "predicted_class": response.result.predicted_class},
    )


async def explain_cached(slot: ModelSlot[ClassificationCard], model: RunnerModel[ClassificationCard],
                         cached: CachedRequest, options: GradCamOptions) -> ExplainResponse:
    """Grad-CAM of a cached CT input with the served model (warning when it is not the version that answered)."""
    layer = model.describe.get("gradcam_layer")
    if cached.model_id != slot.model_id:
        raise InvalidRequest(f"request {cached.request_id!r} was a {cached.model_id} request")
    if layer is None:
        raise XaiGenerationError(f"{model.tag} has no differentiable weights for Grad-CAM")
    if options.layer_name not in (None, layer):
        raise InvalidRequest(f"Grad-CAM is served on layer {layer!r} only", {"layer_name": options.layer_name})
    try:
        colorize(np.zeros((1, 1), np.float32), options.colormap)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc
    heatmap = (await slot.call("explain", cached.arrays["tensor"][None]))[0]
    display = cached.arrays["display"].astype(np.float32) / 255.0
    labels = model.card.contract_labels()
    warnings = [] if model.tag == cached.model_version else [
        f"explained with {model.tag}; the prediction was made by {cached.model_version}"
    ]
    explanation = heatmap_explanation(heatmap, display, method="grad_cam", layer_name=layer, colormap=options.colormap,
                                      target_class=cached.facts.get("predicted_class", labels[0]))
    return ExplainResponse(request_id=cached.request_id, model_id=slot.model_id, model_version=model.tag,
                           intended_use=model.card.intended_use, warnings=warnings, xai={"grad_cam": explanation})
