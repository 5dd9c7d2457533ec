"""Torch segmentation architectures a card may name, so runners and training rebuild the same module."""

from __future__ import annotations

import torch

from core.cards.segmentation import SegmentationArchitecture


def build_segmenter(arch: SegmentationArchitecture) -> torch.nn.Module:
    """Instantiate the module a segmentation card describes (whitelisted factories only)."""
    if arch.factory == "monai.SegResNet":
        from monai.networks.nets import SegResNet

        return SegResNet(**arch.kwargs)
    raise ValueError(f"unknown architecture factory {arch.factory!r}")  # pragma: no cover - Literal guards it


def load_segmenter(arch: SegmentationArchitecture, weights_path: str) -> torch.nn.Module:
    """Rebuild the module and load its weights (tensors only: `weights_only=True`), in eval mode."""
    module = build_segmenter(arch)
    module.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return module.eval()
