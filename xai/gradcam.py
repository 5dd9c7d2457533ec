"""Batched Grad-CAM on a torch classifier (MONAI's implementation), normalised per image to [0, 1]."""

from __future__ import annotations

import numpy as np
import torch
from monai.visualize import GradCAM

from xai.render import normalise_per_image


def _identity(maps: torch.Tensor) -> torch.Tensor:
    return maps


class GradCamExplainer:
    """Grad-CAM maps for a batch, each for the image's own top class, at the model's input resolution."""

    def __init__(self, module: torch.nn.Module, layer_name: str, device: torch.device) -> None:
        if layer_name not in dict(module.named_modules()):
            raise ValueError(f"model has no layer {layer_name!r} for Grad-CAM")
        self.layer_name = layer_name
        self.device = device
        self.module = module.to(device).eval()
        self._cam = GradCAM(nn_module=self.module, target_layers=layer_name, postprocessing=_identity)

    def explain(self, batch_nchw: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 -> (N, H, W) float32 in [0, 1], each for the image's own top class.

        MONAI scores a batch with one class index per call (a per-image index tensor would mix the images'
        gradients), so the batch is explained in one call per predicted class.
        """
        x = torch.from_numpy(np.ascontiguousarray(batch_nchw, dtype=np.float32)).to(self.device)
        with torch.no_grad():
            top = self.module(x).argmax(dim=1)
        maps = torch.empty((x.shape[0], *x.shape[2:]), device=self.device)
        for class_index in top.unique():
            members = top == class_index
            maps[members] = self._cam(x[members], class_idx=int(class_index))[:, 0].detach()
        return normalise_per_image(maps.float().cpu().numpy())

