"""Torch architectures a card may name, so a runner can rebuild a module from its stored state dict."""

from __future__ import annotations

import torch

from core.cards.classification import TorchArchitecture


def build_module(arch: TorchArchitecture) -> torch.nn.Module:
    """Instantiate the module a card describes (only whitelisted factories: no arbitrary imports)."""
    if arch.factory == "monai.ResNet":
        from monai.networks.nets import ResNet

        return ResNet(**arch.kwargs)
    raise ValueError(f"unknown architecture factory {arch.factory!r}")  # pragma: no cover - Literal guards it


def load_module(arch: TorchArchitecture, weights_path: str) -> torch.nn.Module:
    """Rebuild the module and load its weights (tensors only: `weights_only=True`), in eval mode."""
    module = build_module(arch)
    module.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return module.eval()
