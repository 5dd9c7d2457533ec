"""MRISegmenter: the tumour segmenter from the model store, sliding-window inference with cooperative cancel.

Engines: torch on CUDA with fp16 autocast when torch sees a GPU; otherwise ONNX Runtime (its CUDA provider when it
loads, else CPU). Windows run in batches of the card's `sw_batch_size`; between batches the runner reports progress
to the task store and stops with TaskCancelled when the task's cancel flag is set.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import bentoml
import numpy as np
import torch
from monai.inferers import SlidingWindowInferer

from core import store
from core.cards.segmentation import SegmentationCard
from core.errors import ModelNotLoaded
from core.networks import load_module
from core.settings import get_settings
from core.tasks import INFERENCE_PROGRESS_END, STEP_PROGRESS, TaskStore, task_store_path
from postprocessing.uncertainty import FLIPS, flip_passes
from runners.common import RUNNER_CONNECTION, cuda_available, onnx_session
from runners.switching import SwitchableModel
from xai.segmentation_cam import SegmentationGradCam

log = logging.getLogger(__name__)
settings = get_settings()

MRI_TIMEOUT_SECONDS = 1800
"""Traffic timeout of the runner, which BentoML also applies to the task's call into it (docs/bentoml-pitfalls.md G9): 30 minutes."""

WindowPredictor = Callable[[torch.Tensor], torch.Tensor]
ProgressHook = Callable[[int, int, float], None]


@dataclass
class SegmentationEngine:
    """Runs batches of windows: torch on CUDA (fp16 autocast) or ONNX Runtime."""

    name: str
    predict: WindowPredictor
    device: torch.device


def onnx_predictor(path: str) -> SegmentationEngine:
    session, name = onnx_session(path)
    input_name = session.get_inputs()[0].name

    def predict(windows: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {input_name: windows.numpy().astype(np.float32, copy=False)})[0])

    return SegmentationEngine(name=name, predict=predict, device=torch.device("cpu"))


def torch_cuda_predictor(module: torch.nn.Module) -> SegmentationEngine:
    device = torch.device("cuda")
    module = module.to(device).eval()

    def predict(windows: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            return module(windows.to(device, non_blocking=True)).float()

    return SegmentationEngine(name="torch-cuda-fp16", predict=predict, device=device)


def window_count(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """How many windows MONAI's sliding window visits over `shape` (the image is padded up to the roi first)."""
    count = 1
    for size, window in zip(shape, roi):
        interval = max(int(window * (1 - overlap)), 1)
        count *= 1 if size <= window else math.ceil((size - window) / interval) + 1
    return count


class _CountingPredictor:
    """Wraps a predictor: calls `hook(done, total, seconds per window)` before each window batch."""

    def __init__(self, predict: WindowPredictor, total: int, hook: ProgressHook) -> None:
        self.predict, self.total, self.hook = predict, total, hook
        self.done, self.started = 0, time.perf_counter()

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        per_window = (time.perf_counter() - self.started) / self.done if self.done else 0.0
        self.hook(self.done, self.total, per_window)
        output = self.predict(windows)
        self.done += len(windows)
        return output


@dataclass
class LoadedSegmenter:
    """A segmenter ready to serve: its card, engine and (with torch weights) Grad-CAM."""

    tag: str
    card: SegmentationCard
    engine: SegmentationEngine
    explainer: SegmentationGradCam | None
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def segment(self, volume: np.ndarray, hook: ProgressHook) -> np.ndarray:
        """(C, X, Y, Z) prepared volume -> (K, X, Y, Z) float16 class probabilities on the same grid."""
        spec = self.card.inference
        device = self.engine.device
        inferer = SlidingWindowInferer(roi_size=spec.roi_size, sw_batch_size=spec.sw_batch_size, overlap=spec.overlap,
                                       mode=spec.mode, sw_device=device, device=device)
        predictor = _CountingPredictor(self.engine.predict, window_count(volume.shape[1:], spec.roi_size, spec.overlap), hook)
        with torch.inference_mode():
            output = inferer(torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None], predictor)[0]
            if self.card.output_kind == "logits":
                output = torch.softmax(output.float(), dim=0)
        return output.to(torch.float16).cpu().numpy()

    def segment_passes(self, volume: np.ndarray, hook: ProgressHook) -> np.ndarray:
        """(C, X, Y, Z) -> (passes, K, X, Y, Z) float16 probabilities of the test-time-augmentation passes (the first
        unmirrored); progress runs once over all passes."""
        def run(mirrored: np.ndarray, index: int) -> np.ndarray:
            def pass_hook(done: int, total: int, seconds_per_window: float) -> None:
                hook(index * total + done, len(FLIPS) * total, seconds_per_window)

            return self.segment(mirrored, pass_hook)

        return flip_passes(run, volume)

    def explain(self, volume: np.ndarray) -> np.ndarray:
        """(C, X, Y, Z) prepared volume -> (X, Y, Z) Grad-CAM map of the tumour prediction in [0, 1]."""
        if self.explainer is None:
            raise ModelNotLoaded(f"model {self.tag} has no differentiable weights for Grad-CAM")
        return self.explainer.explain(volume)


def select_segmentation_engine(model: bentoml.Model, card: SegmentationCard) -> SegmentationEngine:
    """torch on CUDA with fp16 autocast when torch sees a GPU and the card has torch weights; ONNX Runtime otherwise."""
    if card.torch is not None and cuda_available():
        return torch_cuda_predictor(load_module(card.torch, model.path_of(card.torch.weights_file)))
    return onnx_predictor(model.path_of(card.model_file))


def load_segmenter_model(model: bentoml.Model) -> LoadedSegmenter:
    """Build engine and explainer (own module copy: Grad-CAM hooks stay off the serving path), warmed up."""
    card = store.read_card(model, SegmentationCard)
    engine = select_segmentation_engine(model, card)
    explainer = None
    if card.torch is not None:
        tumour_channels = [label.channel for label in card.tumor_labels()]
        explainer = SegmentationGradCam(load_module(card.torch, model.path_of(card.torch.weights_file)),
                                        card.torch.gradcam_layer, tumour_channels, engine.device, card.torch.size_multiple())
    loaded = LoadedSegmenter(tag=str(model.tag), card=card, engine=engine, explainer=explainer)
    loaded.segment(np.zeros((len(card.input.sequences), *card.inference.roi_size), np.float32), lambda *_: None)
    return loaded


MODEL_ID = "mri_segmentation"


@bentoml.service(name="MRISegmenter", workers=1, traffic={"timeout": MRI_TIMEOUT_SECONDS},
                 runner_connection=RUNNER_CONNECTION)
class MRISegmenter:
    """Runner for `mri_segmentation`. Receives prepared volumes; knows nothing of HTTP.

    The served model follows `core.active_models` (hot switch, rollback); a call runs wholly on one model.
    """

    model_ref = bentoml.models.BentoModel(settings.mri.model_tag)

    def __init__(self) -> None:
        self.served = SwitchableModel(MODEL_ID, settings.mri.model_tag, lambda: self.model_ref, load_segmenter_model)
        self.tasks = TaskStore(task_store_path(settings.data_dir))

    def _progress_hook(self, task_id: str) -> ProgressHook:
        """Report inference progress and stop on cancel, between window batches (no-op without a task)."""
        start, span = STEP_PROGRESS["inference"], INFERENCE_PROGRESS_END - STEP_PROGRESS["inference"]

        def hook(done: int, total: int, seconds_per_window: float) -> None:
            if task_id:
                eta = round(seconds_per_window * (total - done), 1) if done else None
                self.tasks.report(task_id, "inference", start + span * done // max(total, 1), eta)

        return hook

    @bentoml.api
    def segment(self, volume: np.ndarray, task_id: str = "") -> np.ndarray:
        """(C, X, Y, Z) prepared volume -> (K, X, Y, Z) float16 class probabilities (card label channel order)."""
        started = time.perf_counter()
        probabilities = self.served.get()[0].segment(volume, self._progress_hook(task_id))
        self.served.record_timing(started, 1)
        return probabilities

    @bentoml.api
    def segment_passes(self, volume: np.ndarray, task_id: str = "") -> np.ndarray:
        """(C, X, Y, Z) prepared volume -> (8, K, X, Y, Z) float16 probabilities of the mirrored passes (uncertainty; not in
        the live timing, which stays one plain pass per volume)."""
        return self.served.get()[0].segment_passes(volume, self._progress_hook(task_id))

    @bentoml.api
    def explain(self, volume: np.ndarray, task_id: str = "") -> np.ndarray:
        """(C, X, Y, Z) prepared volume -> (X, Y, Z) Grad-CAM map in [0, 1] of the predicted tumour."""
        if task_id:
            self.tasks.raise_if_cancelled(task_id)
        return self.served.get()[0].explain(volume)

    @bentoml.api
    def describe(self) -> dict[str, Any]:
        """Version, generation, card, engine and live timing of the served model (or why none is loaded)."""
        return self.served.describe()
