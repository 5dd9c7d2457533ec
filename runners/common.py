"""What every runner shares: BentoML service options, engine selection (ONNX Runtime / torch, GPU when present)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

log = logging.getLogger(__name__)

RUNNER_CONNECTION: dict[str, Any] = {"max_requests": 1_000_000_000, "max_age": 1e9}
"""Keep the caller's connection pool to a runner alive: BentoML 1.4.40 recycles it under load and fails requests (docs/bentoml-pitfalls.md G2)."""


def cuda_available() -> bool:
    """Whether torch sees a CUDA device in this process."""
    return torch.cuda.is_available()


def gpu_devices() -> list[str]:
    """Names of the CUDA devices torch sees."""
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda_available() else []


def onnx_session(path: str, prefer_gpu: bool = True) -> tuple[ort.InferenceSession, str]:
    """An ONNX Runtime session with all graph optimisations; the CUDA provider when it really loads."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    if prefer_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(path, sess_options=options, providers=providers)
    active = session.get_providers()[0]
    return session, "onnxruntime-cuda" if active == "CUDAExecutionProvider" else "onnxruntime-cpu"


@dataclass
class Engine:
    """Runs a batch through the model: ONNX Runtime (CUDA or CPU), or a torch module on CUDA."""

    name: str
    session: ort.InferenceSession | None = None
    module: torch.nn.Module | None = None
    device: torch.device = torch.device("cpu")

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The model's first output for a float32 batch."""
        if self.session is not None:
            input_name = self.session.get_inputs()[0].name
            return self.session.run(None, {input_name: batch.astype(np.float32, copy=False)})[0]
        with torch.inference_mode():
            return self.module(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()


def select_engine(onnx_path: str, torch_module: torch.nn.Module | None) -> Engine:
    """ONNX Runtime with CUDA when it loads; torch on CUDA when only torch sees a GPU; ONNX Runtime on CPU otherwise."""
    session, name = onnx_session(onnx_path)
    if name == "onnxruntime-cpu" and torch_module is not None and cuda_available():
        device = torch.device("cuda")
        log.info("ONNX Runtime has no working CUDA provider; serving with torch on %s", torch.cuda.get_device_name(0))
        return Engine(name="torch-cuda", module=torch_module.to(device).eval(), device=device)
    return Engine(name=name, session=session)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 for stable sums, returned as float32."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
