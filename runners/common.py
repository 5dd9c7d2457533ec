"""What every runner shares: BentoML service options, lazily built Grad-CAM (engines are in `runners.engines`). The
BentoML patches (batching policy, per-request savings) are installed explicitly: `api.bentoml_patches.install`."""

from __future__ import annotations

import glob
import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

RUNNER_CONNECTION: dict[str, Any] = {"max_requests": 1_000_000_000, "max_age": 1e9}
"""Keep the caller's connection pool to a runner alive: BentoML 1.4.40 recycles it under load and fails requests (docs/bentoml-pitfalls.md G2)."""

ACCESS_LOG_OFF: dict[str, Any] = {"access": {"enabled": False}}
"""BentoML's own access line per request, off in every service: the API's one line per request is the structured,
PHI-safe `neuronova.access` log (api/access_log.py); runner calls are internal (formatting and writing a line each
costs more CPU than the biomarker model itself)."""


class Explainer(Protocol):
    """What builds maps for a batch of prepared inputs (CT slices or one MRI volume)."""

    def explain(self, batch: np.ndarray) -> np.ndarray: ...


class LazyGradCam:
    """Grad-CAM of a model with torch weights, built on the first explanation: a CPU host serves with ONNX Runtime,
    so torch, MONAI and the weights (~400 MB per process) are loaded (a few seconds, once) only when Grad-CAM is
    asked for."""

    def __init__(self, layer_name: str, build: Callable[[], Explainer]) -> None:
        self.layer_name = layer_name
        self._build = build
        self._explainer: Explainer | None = None
        self._lock = threading.Lock()

    def explain(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            if self._explainer is None:
                self._explainer = self._build()
        return self._explainer.explain(batch)


def nvidia_host() -> bool:
    """Whether this host has an NVIDIA device node (asks no driver and imports nothing)."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 for stable sums, returned as float32."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
