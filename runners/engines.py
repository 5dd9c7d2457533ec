"""Model engines for the runners: ONNX Runtime (CUDA provider when it loads, else CPU) or torch on CUDA.

Imported by the runners when they load a model, never by the API workers. torch (~300 MB per process) is imported
only where it is used: on a host without an NVIDIA device node a runner serving ONNX never loads it for the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from runners.common import nvidia_host

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def cuda_available() -> bool:
    """Whether torch sees a CUDA device in this process (False without asking torch when no NVIDIA device exists)."""
    if not nvidia_host():
        return False
    import torch

    return torch.cuda.is_available()


def gpu_devices() -> list[str]:
    """Names of the CUDA devices torch sees."""
    if not cuda_available():
        return []
    import torch

    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def onnx_session(path: str, prefer_gpu: bool = True, intra_op_threads: int = 0) -> tuple[ort.InferenceSession, str]:
    """An ONNX Runtime session with all graph optimisations; the CUDA provider when it really loads.

    `intra_op_threads` 0 is ONNX Runtime's default (one per physical core). Idle pool threads never spin: spinning
    threads burn the cores that the API workers and the other runners share on a CPU host.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
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
    device: Any = "cpu"
    """Where the model's tensors live: "cpu" for ONNX Runtime on the CPU, the torch device otherwise."""

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The model's first output for a float32 batch."""
        if self.session is not None:
            input_name = self.session.get_inputs()[0].name
            return self.session.run(None, {input_name: batch.astype(np.float32, copy=False)})[0]
        import torch

        with torch.inference_mode():
            return self.module(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()


def select_engine(onnx_path: str, torch_module: Callable[[], torch.nn.Module] | None,
                  intra_op_threads: int = 0) -> Engine:
    """ONNX Runtime with CUDA when it loads; torch on CUDA when only torch sees a GPU (the module is then loaded
    with `torch_module`); ONNX Runtime on CPU otherwise."""
    session, name = onnx_session(onnx_path, intra_op_threads=intra_op_threads)
    if name == "onnxruntime-cpu" and torch_module is not None and cuda_available():
        import torch

        device = torch.device("cuda")
        log.info("ONNX Runtime has no working CUDA provider; serving with torch on %s", torch.cuda.get_device_name(0))
        return Engine(name="torch-cuda", module=torch_module().to(device).eval(), device=device)
    return Engine(name=name, session=session)
