"""MRISegmenter: the tumour segmenter runner; the model itself (engines, sliding window, Grad-CAM) is in
`runners.mri_model`, imported when the runner starts, so processes that only call this runner (the API workers, the
arbiter) never load it; on a CPU host the runner itself loads torch and MONAI with its first volume.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

import bentoml
import numpy as np

from core.errors import DependencyUnavailable
from core.settings import get_settings
from state.tasks import INFERENCE_PROGRESS_END, STEP_PROGRESS
from state.stores import open_task_store
from runners.common import ACCESS_LOG_OFF, RUNNER_CONNECTION
from runners.switching import SwitchableModel

if TYPE_CHECKING:
    from runners.mri_model import ProgressHook

settings = get_settings()

MRI_TIMEOUT_SECONDS = 1800
"""Traffic timeout of the runner, which BentoML also applies to the task's call into it (docs/bentoml-pitfalls.md G9): 30 minutes."""

MODEL_ID = "mri_segmentation"


@bentoml.service(name="MRISegmenter", workers=1, traffic={"timeout": MRI_TIMEOUT_SECONDS},
                 runner_connection=RUNNER_CONNECTION, logging=ACCESS_LOG_OFF)
class MRISegmenter:
    """Runner for `mri_segmentation`. Receives prepared volumes; knows nothing of HTTP.

    The served model follows `state.active_models` (hot switch, rollback); a call runs wholly on one model.
    """

    model_ref = bentoml.models.BentoModel(settings.mri.model_tag)

    def __init__(self) -> None:
        from runners import mri_model

        self.served = SwitchableModel(MODEL_ID, settings.mri.model_tag, lambda: self.model_ref,
                                      lambda model: mri_model.load_segmenter_model(model))
        self.tasks = open_task_store(settings)

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
            with contextlib.suppress(DependencyUnavailable):  # no answer from the store is no cancel: run on
                self.tasks.raise_if_cancelled(task_id)
        return self.served.get()[0].explain(volume)

    @bentoml.api
    async def describe(self) -> dict[str, Any]:
        """Version, generation, card, engine and live timing of the served model (or why none is loaded).
        Async: answered on the event loop, not queued behind a long batch in the runner's one model thread."""
        return self.served.describe()
