"""The MRI segmenter behind the MRISegmenter runner: loading, sliding-window inference with progress hooks, Grad-CAM.

Engines: torch on CUDA with fp16 autocast when torch sees a GPU; otherwise ONNX Runtime (its CUDA provider when it
loads, else CPU). Windows run in batches of the card's `sw_batch_size`; between batches the runner reports progress
to the task store and stops with TaskCancelled when the task's cancel flag is set.

On ONNX Runtime the model is checked and warmed up on one window at start, while torch and MONAI (MONAI's sliding
window, Grad-CAM: ~400 MB per process) are imported by the first volume: a server that sees no MRI never loads them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bentoml
import numpy as np

from core import store
from core.cards.segmentation import SegmentationCard
from core.errors import ModelNotLoaded
from postprocessing.uncertainty import FLIPS, flip_passes
from runners.common import LazyGradCam
from runners.engines import cuda_available, onnx_session

if TYPE_CHECKING:
    import torch


WindowPredictor = Callable[["torch.Tensor"], "torch.Tensor"]
ProgressHook = Callable[[int, int, float], None]


@dataclass
class SegmentationEngine:
    """Runs batches of windows: torch on CUDA (fp16 autocast) or ONNX Runtime."""

    name: str
    predict: WindowPredictor
    device: Any
    """Where the windows run: "cpu" for ONNX Runtime on the CPU, else the torch device."""


def onnx_predictor(path: str, window: tuple[int, ...]) -> SegmentationEngine:
    """ONNX Runtime, checked and warmed up on one blank window of shape `window` (C, X, Y, Z)."""
    session, name = onnx_session(path)
    input_name = session.get_inputs()[0].name
    session.run(None, {input_name: np.zeros((1, *window), np.float32)})

    def predict(windows: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.from_numpy(session.run(None, {input_name: windows.numpy().astype(np.float32, copy=False)})[0])

    return SegmentationEngine(name=name, predict=predict, device="cpu")


def torch_cuda_predictor(module: torch.nn.Module) -> SegmentationEngine:
    import torch

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
    explainer: LazyGradCam | None
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def segment(self, volume: np.ndarray, hook: ProgressHook) -> np.ndarray:
        """(C, X, Y, Z) prepared volume -> (K, X, Y, Z) float16 class probabilities on the same grid."""
        import torch
        from monai.inferers import SlidingWindowInferer

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
        from core.networks import load_module

        return torch_cuda_predictor(load_module(card.torch, model.path_of(card.torch.weights_file)))
    return onnx_predictor(model.path_of(card.model_file), (len(card.input.sequences), *card.inference.roi_size))


def load_segmenter_model(model: bentoml.Model) -> LoadedSegmenter:
    """Build the engine (warmed up) and, lazily, the explainer (own module copy: Grad-CAM hooks stay off the serving
    path)."""
    card = store.read_card(model, SegmentationCard)
    engine = select_segmentation_engine(model, card)
    explainer = None
    if card.torch is not None:
        weights = Path(model.path_of(card.torch.weights_file))
        if not weights.is_file():
            raise FileNotFoundError(f"{model.tag} has no {card.torch.weights_file} for Grad-CAM")
        explainer = LazyGradCam(card.torch.gradcam_layer, lambda: _gradcam(card, weights, engine.device))
    loaded = LoadedSegmenter(tag=str(model.tag), card=card, engine=engine, explainer=explainer)
    if engine.device != "cpu":
        loaded.segment(np.zeros((len(card.input.sequences), *card.inference.roi_size), np.float32), lambda *_: None)
    return loaded


def _gradcam(card: SegmentationCard, weights: Path, device: Any) -> Any:
    from core.networks import load_module
    from xai.segmentation_cam import SegmentationGradCam

    tumour_channels = [label.channel for label in card.tumor_labels()]
    return SegmentationGradCam(load_module(card.torch, str(weights)), card.torch.gradcam_layer, tumour_channels, device,
                               card.torch.size_multiple())
