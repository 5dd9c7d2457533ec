"""Grad-CAM for a 3D segmenter (Seg-Grad-CAM): which features drove the voxels the model calls tumour.

The score differentiated is the mean tumour logit over the voxels predicted as tumour (over the whole volume
when none is), through MONAI's GradCAM on a wrapper that turns the segmenter into a two-score model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.visualize import GradCAM

_TUMOUR_SCORE = 1


def _identity(maps: torch.Tensor) -> torch.Tensor:
    """No post-processing in MONAI (its default normaliser inverts the map); normalised in `explain`."""
    return maps


class _TumourScore(torch.nn.Module):
    """(N, C, X, Y, Z) -> (N, 2): [0, mean tumour logit over the predicted tumour voxels]."""

    def __init__(self, segmenter: torch.nn.Module, tumour_channels: Sequence[int]) -> None:
        super().__init__()
        self.segmenter = segmenter
        self.tumour_channels = list(tumour_channels)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        logits = self.segmenter(volume)
        tumour_logit = logits[:, self.tumour_channels].amax(dim=1)
        predicted = torch.isin(logits.argmax(dim=1), torch.tensor(self.tumour_channels, device=logits.device)).float()
        predicted = predicted.flatten(1)
        weights = torch.where(predicted.sum(1, keepdim=True) > 0, predicted, torch.ones_like(predicted))
        score = (tumour_logit.flatten(1) * weights).sum(1) / weights.sum(1)
        return torch.stack([torch.zeros_like(score), score], dim=1)


class SegmentationGradCam:
    """Grad-CAM maps of a segmenter's tumour prediction at one layer, in [0, 1], at the input's resolution."""

    def __init__(self, segmenter: torch.nn.Module, layer_name: str, tumour_channels: Sequence[int],
                 device: torch.device, size_multiple: int) -> None:
        if layer_name not in dict(segmenter.named_modules()):
            raise ValueError(f"model has no layer {layer_name!r} for Grad-CAM")
        self.layer_name = layer_name
        self.device = device
        self.size_multiple = size_multiple
        wrapper = _TumourScore(segmenter.to(device).eval(), tumour_channels)
        self._cam = GradCAM(nn_module=wrapper, target_layers=f"segmenter.{layer_name}", postprocessing=_identity)

    def explain(self, volume: np.ndarray) -> np.ndarray:
        """(C, X, Y, Z) model input -> (X, Y, Z) float32 map in [0, 1] (zero-padded to the network's multiple)."""
        shape = volume.shape[1:]
        padded = [(0, 0)] + [(0, -n % self.size_multiple) for n in shape]
        batch = torch.from_numpy(np.pad(volume.astype(np.float32), padded)[None]).to(self.device)
        cam = self._cam(batch, class_idx=_TUMOUR_SCORE)[0, 0].detach().float().cpu().numpy()
        cam = cam[tuple(slice(0, n) for n in shape)]
        low, high = float(cam.min()), float(cam.max())
        return ((cam - low) / (high - low) if high > low else np.zeros_like(cam)).astype(np.float32)
