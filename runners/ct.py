"""CTClassifier: the slice classifier from the model store, batched, with batched Grad-CAM."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import bentoml
import numpy as np

from core import store
from core.cards.classification import ClassificationCard
from core.errors import ModelNotLoaded
from core.networks import load_module
from core.settings import get_settings
from runners.common import RUNNER_CONNECTION, Engine, select_engine, softmax
from xai.gradcam import GradCamExplainer

log = logging.getLogger(__name__)
settings = get_settings()


@dataclass
class LoadedClassifier:
    """A classifier ready to serve: its card, engine and (when it has torch weights) Grad-CAM."""

    tag: str
    card: ClassificationCard
    engine: Engine
    explainer: GradCamExplainer | None
    loaded_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (N, len(card.labels)) in the model's label order."""
        outputs = self.engine.run(batch)
        return softmax(outputs) if self.card.output_kind == "logits" else outputs.astype(np.float32)

    def explain(self, batch: np.ndarray) -> np.ndarray:
        """Grad-CAM maps (N, H, W) in [0, 1] for each image's top class."""
        if self.explainer is None:
            raise ModelNotLoaded(f"model {self.tag} has no differentiable weights for Grad-CAM")
        nchw = np.moveaxis(batch, -1, 1) if self.card.input.layout == "NHWC" else batch
        return self.explainer.explain(nchw)


def load_classifier(model: bentoml.Model) -> LoadedClassifier:
    """Build the engine and explainer for a stored classifier and warm both up with a blank input."""
    card = store.read_card(model, ClassificationCard)
    module = load_module(card.torch, model.path_of(card.torch.weights_file)) if card.torch else None
    engine = select_engine(model.path_of(card.model_file), module)
    explainer = GradCamExplainer(module, card.torch.gradcam_layer, engine.device) if module is not None else None
    loaded = LoadedClassifier(tag=str(model.tag), card=card, engine=engine, explainer=explainer)
    spec = card.input
    shape = (1, spec.channels, spec.height, spec.width) if spec.layout == "NCHW" else (1, spec.height, spec.width, spec.channels)
    loaded.predict(np.zeros(shape, np.float32))
    if explainer is not None:
        loaded.explain(np.zeros(shape, np.float32))
    return loaded


@bentoml.service(name="CTClassifier", workers=1, traffic={"timeout": 120}, runner_connection=RUNNER_CONNECTION)
class CTClassifier:
    """Runner for `ct_classification`. Receives preprocessed batches; knows nothing of HTTP."""

    model_ref = bentoml.models.BentoModel(settings.ct.model_tag)

    def __init__(self) -> None:
        self.model: LoadedClassifier | None = None
        self.load_error: str | None = None
        self._timing = [0.0, 0]
        try:
            self.model = load_classifier(self.model_ref)
            log.info("CT classifier %s loaded on %s", self.model.tag, self.model.engine.name)
        except Exception as exc:  # noqa: BLE001 - a runner that cannot load stays up and reports why
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("CT classifier %s failed to load: %s", settings.ct.model_tag, self.load_error)

    def _loaded(self) -> LoadedClassifier:
        if self.model is None:
            raise ModelNotLoaded(f"CT model failed to load: {self.load_error}")
        return self.model

    @bentoml.api(batchable=True, max_batch_size=settings.ct_max_batch_size, max_latency_ms=settings.batch_max_latency_ms)
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) or (N, H, W, C) prepared slices -> (N, K) probabilities in the card's label order."""
        started = time.perf_counter()
        probabilities = self._loaded().predict(batch)
        self._timing[0] += (time.perf_counter() - started) * 1000.0
        self._timing[1] += len(batch)
        return probabilities

    @bentoml.api(batchable=True, max_batch_size=min(16, settings.ct_max_batch_size), max_latency_ms=settings.batch_max_latency_ms)
    def explain(self, batch: np.ndarray) -> np.ndarray:
        """Prepared slices -> (N, H, W) Grad-CAM maps in [0, 1] for each slice's top class."""
        return self._loaded().explain(batch)

    @bentoml.api
    def describe(self) -> dict[str, Any]:
        """Version, card, engine and live timing of the loaded model (or why it is not loaded)."""
        total_ms, count = self._timing
        if self.model is None:
            return {"loaded": False, "error": self.load_error, "tag": settings.ct.model_tag}
        return {
            "loaded": True,
            "tag": self.model.tag,
            "card": self.model.card.model_dump(mode="json"),
            "engine": self.model.engine.name,
            "loaded_at": self.model.loaded_at,
            "gradcam_layer": self.model.explainer.layer_name if self.model.explainer else None,
            "avg_inference_time_ms_per_image": round(total_ms / count, 3) if count else None,
        }
