"""CTClassifier: the slice classifier from the model store, batched, with batched Grad-CAM and occlusion maps.

ONNX Runtime is imported where a model is loaded (`load_classifier`), so the processes that only call this runner
(the API workers, the arbiter) do not load it; torch and MONAI (~400 MB) are imported by the first Grad-CAM request
(`LazyGradCam`) unless the model itself runs on torch (a GPU host without ONNX Runtime's CUDA provider).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bentoml
import numpy as np

from core import store
from core.cards.classification import ClassificationCard
from core.errors import ModelNotLoaded
from core.generation import with_generation
from core.ood import ood_scores
from core.settings import get_settings
from runners.common import ACCESS_LOG_OFF, RUNNER_CONNECTION, LazyGradCam, nvidia_host, softmax
from runners.switching import SwitchableModel
from xai.occlusion import DEFAULT_STEPS, occlusion_maps

if TYPE_CHECKING:
    from runners.engines import Engine
    from xai.gradcam import GradCamExplainer

log = logging.getLogger(__name__)
settings = get_settings()


@dataclass
class LoadedClassifier:
    """A classifier ready to serve: its card, engine and (when it has torch weights) Grad-CAM."""

    tag: str
    card: ClassificationCard
    engine: Engine
    explainer: LazyGradCam | None
    occlusion_steps: int = DEFAULT_STEPS
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (N, len(card.labels)) in the model's label order."""
        return self._probabilities(self.engine.run(batch))

    def predict_scored(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and each image's OOD score (higher = less like the training data, see core.ood)."""
        outputs = self.engine.run(batch)
        score = self.card.ood.score if self.card.ood else None
        return self._probabilities(outputs), ood_scores(outputs, self.card.output_kind, score)

    def _probabilities(self, outputs: np.ndarray) -> np.ndarray:
        return softmax(outputs) if self.card.output_kind == "logits" else outputs.astype(np.float32)

    def explain(self, batch: np.ndarray) -> np.ndarray:
        """Grad-CAM maps (N, H, W) in [0, 1] for each image's top class."""
        if self.explainer is None:
            raise ModelNotLoaded(f"model {self.tag} has no differentiable weights for Grad-CAM")
        nchw = np.moveaxis(batch, -1, 1) if self.card.input.layout == "NHWC" else batch
        return self.explainer.explain(nchw)

    def occlude(self, batch: np.ndarray) -> np.ndarray:
        """Occlusion-sensitivity maps (N, H, W) in [0, 1] for each image's top class; perturbed copies run through
        `predict` in chunks, so any model can be explained."""
        return occlusion_maps(self.predict, batch, self.card.input.layout, steps=self.occlusion_steps)


def load_classifier(model: bentoml.Model) -> LoadedClassifier:
    """Build the engine (and, lazily, Grad-CAM) for a stored classifier; warm the engine up with a blank input."""
    from runners.engines import select_engine

    card = store.read_card(model, ClassificationCard)
    engine = select_engine(model.path_of(card.model_file), _torch_loader(model, card), settings.ct.intra_op_threads)
    explainer = None
    if card.torch is not None:
        if not Path(model.path_of(card.torch.weights_file)).is_file():
            raise FileNotFoundError(f"{model.tag} has no {card.torch.weights_file} for Grad-CAM")
        explainer = LazyGradCam(card.torch.gradcam_layer, lambda: _gradcam(_torch_loader(model, card)(), card, engine))
    loaded = LoadedClassifier(tag=str(model.tag), card=card, engine=engine, explainer=explainer,
                              occlusion_steps=settings.occlusion_steps)
    spec = card.input
    shape = (1, spec.channels, spec.height, spec.width) if spec.layout == "NCHW" else (1, spec.height, spec.width, spec.channels)
    loaded.predict(np.zeros(shape, np.float32))
    return loaded


def _torch_loader(model: bentoml.Model, card: ClassificationCard) -> Callable[[], Any] | None:
    """A function that rebuilds the card's torch module from the stored weights (None without torch weights)."""
    if card.torch is None:
        return None
    torch_spec = card.torch

    def load() -> Any:
        from core.networks import load_module

        return load_module(torch_spec, model.path_of(torch_spec.weights_file))

    return load


def _gradcam(module: Any, card: ClassificationCard, engine: Engine) -> GradCamExplainer:
    from xai.gradcam import GradCamExplainer

    return GradCamExplainer(module, card.torch.gradcam_layer, engine.device)


MODEL_ID = "ct_classification"
MAX_BATCH = settings.ct.max_batch_size or (32 if nvidia_host() else 8)
"""Slices per `predict` call (NEURONOVA_CT__MAX_BATCH_SIZE): a GPU gains from large batches; on a CPU a slice costs
the same alone or batched, so a batch only spares per-call overhead, which 8 already does, and the memory arena of
ONNX Runtime stays small (docs/performance.md)."""


@bentoml.service(name="CTClassifier", workers=1, traffic={"timeout": 120}, runner_connection=RUNNER_CONNECTION,
                  logging=ACCESS_LOG_OFF)
class CTClassifier:
    """Runner for `ct_classification`. Receives preprocessed batches; knows nothing of HTTP.

    The served model follows `state.active_models` (hot switch, rollback); each output row of `predict` names the
    generation of the model that produced it.
    """

    model_ref = bentoml.models.BentoModel(settings.ct.model_tag)

    def __init__(self) -> None:
        from runners.engines import gpu_devices

        self.served = SwitchableModel(MODEL_ID, settings.ct.model_tag, lambda: self.model_ref, load_classifier)
        self.gpu_devices = gpu_devices()  # once, at start: on a GPU host it imports torch, never on the event loop

    @bentoml.api(batchable=settings.ct_adaptive_batching, max_batch_size=MAX_BATCH, max_latency_ms=settings.batch_max_latency_ms)
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) or (N, H, W, C) prepared slices -> (N, K + 2): probabilities in the card's label order,
        the OOD score, then the generation of the model that computed them."""
        started = time.perf_counter()
        model, generation = self.served.get()
        probabilities, scores = model.predict_scored(batch)
        self.served.record_timing(started, len(batch))
        return with_generation(np.concatenate([probabilities, scores[:, None]], axis=1), generation)

    @bentoml.api(batchable=settings.ct_adaptive_batching, max_batch_size=16, max_latency_ms=settings.batch_max_latency_ms)
    def explain(self, batch: np.ndarray) -> np.ndarray:
        """Prepared slices -> (N, H, W) Grad-CAM maps in [0, 1] for each slice's top class."""
        return self.served.get()[0].explain(batch)

    @bentoml.api(batchable=settings.ct_adaptive_batching, max_batch_size=4, max_latency_ms=settings.batch_max_latency_ms)
    def occlude(self, batch: np.ndarray) -> np.ndarray:
        """Prepared slices -> (N, H, W) occlusion-sensitivity maps in [0, 1] for each slice's top class (any model)."""
        return self.served.get()[0].occlude(batch)

    @bentoml.api
    async def describe(self) -> dict[str, Any]:
        """Version, generation, card, engine and live timing of the served model (or why none is loaded),
        answered on the event loop (not queued behind a long batch in the runner's one model thread), and the
        GPUs this runner sees (reported by /health: the API workers do not load torch)."""
        return {**self.served.describe(), "gpu_devices": self.gpu_devices}
