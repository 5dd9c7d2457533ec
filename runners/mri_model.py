"""The MRI segmenter behind the MRISegmenter runner: loading, sliding-window inference with progress hooks, Grad-CAM.

Engines: torch on CUDA with fp16 autocast when torch sees a GPU; otherwise ONNX Runtime (its CUDA provider when it
loads, else CPU). Windows run in batches of the card's `sw_batch_size`; between batches the runner reports progress
to the task store and stops with TaskCancelled when the task's cancel flag is set.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import bentoml
import numpy as np
import torch
from monai.inferers import SlidingWindowInferer

from core import store
from core.cards.segmentation import SegmentationCard
from core.errors import ModelNotLoaded
from core.networks import load_module
from postprocessing.uncertainty import FLIPS, flip_passes
from runners.engines import cuda_available, onnx_session
from xai.segmentation_cam import SegmentationGradCam


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
