"""Grad-CAM is batched, normalised per image, and points at what drives the class."""

import numpy as np
import pytest
import torch

from xai.gradcam import GradCamExplainer, normalise_per_image


class QuadrantNet(torch.nn.Module):
    """Class 0 scores the mean of the top-left quadrant's features, class 1 the bottom-right's."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Conv2d(1, 1, 1, bias=False)
        torch.nn.init.ones_(self.features.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.features(x))
        h, w = f.shape[-2] // 2, f.shape[-1] // 2
        return torch.stack([f[..., :h, :w].mean(dim=(-1, -2, -3)), f[..., h:, w:].mean(dim=(-1, -2, -3))], dim=1)


def test_gradcam_peaks_where_the_evidence_is_for_each_image():
    explainer = GradCamExplainer(QuadrantNet(), "features", torch.device("cpu"))
    batch = np.zeros((2, 1, 32, 32), np.float32)
    batch[0, 0, 2:10, 2:10] = 1.0      # top-left evidence -> class 0
    batch[1, 0, 20:30, 20:30] = 1.0    # bottom-right evidence -> class 1
    maps = explainer.explain(batch)
    assert maps.shape == (2, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    peak0 = np.unravel_index(np.argmax(maps[0]), maps[0].shape)
    peak1 = np.unravel_index(np.argmax(maps[1]), maps[1].shape)
    assert peak0[0] < 16 and peak0[1] < 16
    assert peak1[0] >= 16 and peak1[1] >= 16


def test_unknown_layer_is_refused():
    with pytest.raises(ValueError, match="no layer"):
        GradCamExplainer(QuadrantNet(), "layer4", torch.device("cpu"))


def test_normalise_per_image_handles_flat_maps():
    maps = np.stack([np.full((4, 4), 3.0), np.arange(16, dtype=np.float32).reshape(4, 4)])
    out = normalise_per_image(maps)
    assert np.all(out[0] == 0) and out[1].min() == 0 and out[1].max() == 1


def test_batched_maps_equal_one_at_a_time_maps_for_mixed_classes():
    explainer = GradCamExplainer(QuadrantNet(), "features", torch.device("cpu"))
    rng = np.random.default_rng(0)
    batch = rng.random((6, 1, 32, 32)).astype(np.float32)
    batch[::2, 0, :16, :16] += 2.0   # even images: class 0
    batch[1::2, 0, 16:, 16:] += 2.0  # odd images: class 1
    together = explainer.explain(batch)
    alone = np.concatenate([explainer.explain(batch[i:i + 1]) for i in range(len(batch))])
    assert np.allclose(together, alone, atol=1e-5)
