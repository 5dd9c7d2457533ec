"""The CT classification pipeline on the API side: decode, prepare as the served model's card says, run, explain."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, Field

from pipelines.runner_slots import ModelSlot, RunnerModel
from state.request_cache import CachedRequest
from pipelines.shaping import heatmap_explanation
from core.cards.classification import ClassificationCard
from core.errors import InvalidRequest
from core.generation import output_generation
from core.imaging import DecodedSlice
from core.ood import ood_warnings
from core.schemas import CTClassificationResponse, ExplainResponse, HeatmapExplanation
from monitoring import metrics
from preprocessing.decode import decode_slice
from preprocessing.transforms import PreparedSlice, prepare_slice
from xai.render import DEFAULT_COLORMAP, colorize

GRAD_CAM, OCCLUSION = "grad_cam", "occlusion"
RUNNER_METHODS = {GRAD_CAM: "explain", OCCLUSION: "occlude"}
"""Each XAI method and the runner method that computes its maps."""


def requested_methods(xai_methods: Sequence[str] | str) -> list[str]:
    """The caller's xai_methods as a list, or InvalidRequest naming the unsupported ones."""
    methods = [xai_methods] if isinstance(xai_methods, str) else list(xai_methods)
    unsupported = sorted(set(methods) - set(RUNNER_METHODS))
    if unsupported:
        raise InvalidRequest(f"unsupported xai_methods {unsupported}; supported: {list(RUNNER_METHODS)}")
    return methods


def xai_methods_for(model: RunnerModel[ClassificationCard], requested: Sequence[str]) -> tuple[list[str], list[str]]:
    """The methods to run on this model and the warnings to give: Grad-CAM needs the model's torch weights, and an
    imported ONNX model without them is explained by occlusion sensitivity instead."""
    if GRAD_CAM not in requested or model.describe.get("gradcam_layer"):
        return list(dict.fromkeys(requested)), []
    return [OCCLUSION], [f"{model.tag} has no differentiable weights for Grad-CAM; explained by occlusion sensitivity"]


@dataclass(frozen=True)
class Classified:
    """One slice's classification and the exact model version that produced it."""

    model: RunnerModel[ClassificationCard]
    decoded: DecodedSlice
    prepared: PreparedSlice
    probabilities: np.ndarray
    heatmaps: dict[str, np.ndarray]
    ood_score: float
    warnings: list[str] = field(default_factory=list)

    def monitor(self, model_id: str) -> None:
        """Report the answer, its input and its OOD check to the per-version metrics (monitoring/)."""
        card, tag, source = self.model.card, self.model.tag, self.decoded.source
        labels = card.contract_labels()
        metrics.observe_model(model_id, tag, metrics.reference_accuracy(card.metrics))
        metrics.observe_prediction(model_id, tag, "class", labels[int(np.argmax(self.probabilities))])
        metrics.observe_image(model_id, tag, source.format, source.modality, card.input.modalities, self.decoded.shape,
                              self.decoded.pixel_spacing_mm)
        if card.ood is not None:
            metrics.observe_ood(model_id, tag, card.ood.relative(self.ood_score), card.ood.flags(self.ood_score),
                                card.ood.coverage)


async def classify_slice(slot: ModelSlot[ClassificationCard], data: bytes, filename: str | None, *,
                         xai_methods: Sequence[str], max_pixels: int) -> Classified:
    """Decode and prepare with the served model's card, predict (and explain by each method) in the batched runner.

    The runner tags each output row with its OOD score and model generation; when the generation differs from the
    card used to prepare the input (a switch happened in between), the slice is prepared again with the new card
    (`ModelSlot.on_served_model`).
    """
    async def run(model: RunnerModel[ClassificationCard]) -> tuple[Classified, float]:
        card = model.card
        decoded = decode_slice(data, filename, max_pixels=max_pixels, allow_multiframe=card.input.allow_multiframe,
                               modalities=card.input.modalities)
        prepared = prepare_slice(decoded, card.input)
        batch = prepared.tensor[None]
        methods, warnings = xai_methods_for(model, xai_methods)
        outputs = await asyncio.gather(slot.call("predict", batch), *(slot.call(RUNNER_METHODS[m], batch) for m in methods))
        row = outputs[0][0]
        heatmaps = {method: maps[0] for method, maps in zip(methods, outputs[1:])}
        score = float(row[-2])
        warnings += ood_warnings(score, card.ood)
        return Classified(model, decoded, prepared, row[:-2], heatmaps, score, warnings), output_generation(row)

    _, (classified, _) = await slot.on_served_model(run, lambda out: out[1])
    classified.monitor(slot.model_id)
    return classified


def explanations(model: RunnerModel[ClassificationCard], heatmaps: dict[str, np.ndarray], display: np.ndarray,
                 target_class: str, colormaps: Mapping[str, str] | None = None) -> dict[str, HeatmapExplanation]:
    """Each method's map rendered in the input's geometry, keyed and labelled by the method that made it."""
    layer, colormaps = model.describe.get("gradcam_layer"), colormaps or {}
    return {
        method: heatmap_explanation(heatmap, display, method=method, target_class=target_class,
                                    colormap=colormaps.get(method, DEFAULT_COLORMAP),
                                    layer_name=layer if method == GRAD_CAM else None)
        for method, heatmap in heatmaps.items()
    }


class GradCamOptions(BaseModel):
    layer_name: str | None = Field(default=None, description="must be the card's Grad-CAM layer (the only one served)")
    colormap: str = DEFAULT_COLORMAP


class OcclusionOptions(BaseModel):
    colormap: str = DEFAULT_COLORMAP


class ExplainOptions(BaseModel):
    grad_cam: GradCamOptions = Field(default_factory=GradCamOptions)
    occlusion: OcclusionOptions = Field(default_factory=OcclusionOptions)


def cached_classification(response: CTClassificationResponse, out: Classified) -> CachedRequest:
    """What `/xai/explain` and `/feedback` need of a CT prediction later: the prepared input, not the upload."""
    return CachedRequest(
        request_id=response.request_id, model_id=response.model_id, model_version=response.model_version,
        input_sha256=response.metadata.input.sha256 if response.metadata.input else "",
        arrays={"tensor": out.prepared.tensor, "display": (out.prepared.display * 255).round().astype(np.uint8)},
        facts={"labels": out.model.card.contract_labels(), "predicted_class": response.result.predicted_class},
    )


async def explain_cached(slot: ModelSlot[ClassificationCard], model: RunnerModel[ClassificationCard],
                         cached: CachedRequest, xai_methods: Sequence[str], options: ExplainOptions) -> ExplainResponse:
    """Maps of a cached CT input by each method with the served model (warning when it is not the version that
    answered, or when occlusion stands in for Grad-CAM)."""
    layer = model.describe.get("gradcam_layer")
    if cached.model_id != slot.model_id:
        raise InvalidRequest(f"this request_id was a {cached.model_id} request")
    if layer is not None and options.grad_cam.layer_name not in (None, layer):
        raise InvalidRequest(f"Grad-CAM is served on layer {layer!r} only", {"layer_name": options.grad_cam.layer_name})
    methods, warnings = xai_methods_for(model, xai_methods)
    if not methods:
        raise InvalidRequest("xai_methods is empty")
    colormaps = {GRAD_CAM: options.grad_cam.colormap, OCCLUSION: options.occlusion.colormap}
    for method in methods:
        try:
            colorize(np.zeros((1, 1), np.float32), colormaps[method])
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
    tensor = cached.arrays["tensor"][None]
    maps = await asyncio.gather(*(slot.call(RUNNER_METHODS[method], tensor) for method in methods))
    display = cached.arrays["display"].astype(np.float32) / 255.0
    target = cached.facts.get("predicted_class", model.card.contract_labels()[0])
    if model.tag != cached.model_version:
        warnings.append(f"explained with {model.tag}; the prediction was made by {cached.model_version}")
    xai = explanations(model, {method: heatmap[0] for method, heatmap in zip(methods, maps)}, display, target, colormaps)
    return ExplainResponse(request_id=cached.request_id, model_id=slot.model_id, model_version=model.tag,
                           intended_use=model.card.intended_use, warnings=warnings, xai=xai)
