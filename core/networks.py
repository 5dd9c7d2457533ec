"""Torch architectures a card may name, so runners and training rebuild the same module from a stored state dict."""

from __future__ import annotations

from typing import Protocol

import torch


class Architecture(Protocol):
    """What a card's torch section gives: a whitelisted factory name and its keyword arguments."""

    factory: str
    kwargs: dict


def build_module(arch: Architecture) -> torch.nn.Module:
    """Instantiate the module a card describes (only whitelisted MONAI factories: no arbitrary imports)."""
    from monai.networks import nets

    factories = {"monai.ResNet": nets.ResNet, "monai.SegResNet": nets.SegResNet}
    if arch.factory not in factories:
        raise ValueError(f"unknown architecture factory {arch.factory!r}")
    return factories[arch.factory](**arch.kwargs)


def load_module(arch: Architecture, weights_path: str) -> torch.nn.Module:
    """Rebuild the module and load its weights (tensors only: `weights_only=True`), in eval mode."""
    module = build_module(arch)
    module.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return module.eval()
