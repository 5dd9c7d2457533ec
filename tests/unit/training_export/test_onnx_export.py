"""ONNX export with a dynamic batch axis, and the torch-vs-ONNX Runtime parity check."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from core.errors import ModelCardError
from training_export.onnx_export import check_parity, export_onnx
from training_export.train_ct import build_model


@pytest.fixture()
def module() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model()


def _input_dims(path) -> list:
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


def test_export_has_a_dynamic_batch_and_matches_torch(module, tmp_path) -> None:
    path = export_onnx(module, torch.zeros(1, 1, 32, 32), tmp_path / "m.onnx")
    assert path.is_file() and _input_dims(path) == ["batch", 1, 32, 32]
    inputs = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    assert 0.0 <= check_parity(module, path, inputs) < 1e-4


def test_static_batch_when_asked(module, tmp_path) -> None:
    path = export_onnx(module, torch.zeros(1, 1, 32, 32), tmp_path / "m.onnx", dynamic_batch=False)
    assert _input_dims(path) == [1, 1, 32, 32]


def test_export_and_parity_leave_training_mode_as_it_was(module, tmp_path) -> None:
    module.train()
    path = export_onnx(module, torch.zeros(1, 1, 32, 32), tmp_path / "m.onnx")
    check_parity(module, path, np.zeros((2, 1, 32, 32), np.float32))
    assert module.training


def test_parity_failure_names_the_difference(module, tmp_path) -> None:
    path = export_onnx(module, torch.zeros(1, 1, 32, 32), tmp_path / "m.onnx")
    with torch.no_grad():
        module.fc.bias += 0.5
    with pytest.raises(ModelCardError, match=r"differs from torch by 0\.5"):
        check_parity(module, path, np.zeros((2, 1, 32, 32), np.float32))
