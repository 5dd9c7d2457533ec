"""A hospital's own classifier, built here (not downloaded): NHWC RGB input, lower-case labels in its own order."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import bentoml
import pytest
import torch

from training_export.onnx_export import export_onnx

FOREIGN_SIZE = 32


class ForeignNet(torch.nn.Module):
    """Takes (N, H, W, 3) images, returns logits (or probabilities) for its four labels."""

    def __init__(self, probabilities: bool) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=3, padding=1)
        self.head = torch.nn.Linear(4, 4)
        self.probabilities = probabilities

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.relu(self.conv(x.permute(0, 3, 1, 2))).mean(dim=(2, 3)))
        return torch.softmax(logits, dim=1) if self.probabilities else logits


def _export(tmp_path_factory: pytest.TempPathFactory, probabilities: bool) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("foreign") / "hospital.onnx"
    return export_onnx(ForeignNet(probabilities), torch.zeros(1, FOREIGN_SIZE, FOREIGN_SIZE, 3), path)


@pytest.fixture(scope="session")
def foreign_logits_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory, probabilities=False)


@pytest.fixture(scope="session")
def foreign_probabilities_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory, probabilities=True)


@pytest.fixture()
def foreign_card() -> dict:
    """The honest card of the foreign model, as a hospital would write it."""
    return {
        "name": "St Elsewhere CT classifier",
        "intended_use": "research use at St Elsewhere",
        "provenance": {"source": "St Elsewhere radiology", "synthetic_data": False},
        "labels": ["no_tumour", "glioma", "meningioma", "pituitary"],
        "label_map": {
            "no_tumour": "No Tumor",
            "glioma": "Glioma",
            "meningioma": "Meningioma",
            "pituitary": "Pituitary",
        },
        "input": {
            "height": FOREIGN_SIZE,
            "width": FOREIGN_SIZE,
            "channels": 3,
            "layout": "NHWC",
            "scaling": "mean_std",
            "mean": [0.5],
            "std": [0.25],
        },
        "output_kind": "logits",
        "metrics": {"accuracy": 0.91},
    }


def _versions(name: str) -> list[str]:
    """Stored tags of `name` (bentoml.models.list(name) raises when there are none, so list all and filter)."""
    return [str(model.tag) for model in bentoml.models.list() if model.tag.name == name]


@pytest.fixture()
def scratch_model_name() -> Iterator[str]:
    """A test-only store name; every version stored under it is deleted afterwards."""
    name = "test-import"
    yield name
    for tag in _versions(name):
        bentoml.models.delete(tag)


@pytest.fixture()
def stored_versions(scratch_model_name: str) -> Callable[[], list[str]]:
    return lambda: _versions(scratch_model_name)
