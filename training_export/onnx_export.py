"""Torch -> ONNX export with a dynamic batch axis, a parity check of the exported graph against torch, and the one
way a trained torch model enters the model store (`export_and_store`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import onnx
import onnxruntime as ort
import torch

from core import store
from core.cards import ClassificationCard
from core.errors import ModelCardError

INPUT_NAME = "input"
OUTPUT_NAME = "output"


def export_onnx(
    module: torch.nn.Module, example: torch.Tensor, path: str | Path, *, dynamic_batch: bool = True, opset: int = 17
) -> Path:
    """Export `module` (in eval mode) traced on `example` to `path`, check the graph with onnx.checker; return the path.

    Uses the TorchScript ("legacy", `dynamo=False`) exporter: in torch 2.13 the default dynamo exporter needs the
    `onnxscript` package, which is not installed, while the legacy exporter works offline and gives a plain,
    self-contained graph. Its deprecation warning is silenced here on purpose.
    """
    path = Path(path)
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module,
                (example,),
                str(path),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=axes,
                opset_version=opset,
            )
    finally:
        module.train(was_training)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def onnx_cpu_session(onnx_path: str | Path) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with all graph optimisations, as the service runs it."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])


def check_parity(module: torch.nn.Module, onnx_path: str | Path, inputs: np.ndarray, atol: float = 1e-4) -> float:
    """Max absolute difference between torch (eval) and ONNX Runtime outputs on `inputs`; ModelCardError above atol."""
    batch = np.ascontiguousarray(inputs, dtype=np.float32)
    session = onnx_cpu_session(onnx_path)
    exported = session.run(None, {session.get_inputs()[0].name: batch})[0]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            reference = module(torch.from_numpy(batch)).numpy()
    finally:
        module.train(was_training)
    difference = float(np.max(np.abs(exported - reference)))
    if difference > atol:
        raise ModelCardError(
            f"ONNX export differs from torch by {difference:.3g} (tolerance {atol:.3g})",
            {"max_abs_diff": difference, "atol": atol},
        )
    return difference


def export_and_store(
    name: str,
    module: torch.nn.Module,
    parity_inputs: np.ndarray,
    card_for: Callable[[float], ClassificationCard],
    labels: dict[str, str] | None = None,
) -> str:
    """Export `module` to ONNX, check it against torch on `parity_inputs` (ModelCardError beyond the tolerance), keep
    its torch weights (Grad-CAM), and store both under a new version of `name` with the card `card_for` builds from
    the measured max abs difference; return the tag."""
    with TemporaryDirectory(prefix="neuronova-export-") as scratch:
        onnx_path = export_onnx(module, torch.from_numpy(parity_inputs[:1]), Path(scratch) / "model.onnx")
        difference = check_parity(module, onnx_path, parity_inputs)
        weights_path = Path(scratch) / "model.pt"
        torch.save(module.state_dict(), weights_path)
        card = card_for(difference)
        if card.torch is None:
            raise ModelCardError(f"the card of {name} names no torch weights file")
        return store.save_model(name, card, {card.model_file: onnx_path, card.torch.weights_file: weights_path}, labels)
