"""Occlusion sensitivity on models whose answer is known: the map lights up where the evidence is, in either layout,
with exactly steps² perturbed copies per image, run in bounded chunks."""

from __future__ import annotations

import numpy as np
import pytest

from xai.occlusion import occlusion_maps, patch_starts

SIZE = 48
EVIDENCE = (slice(30, 42), slice(6, 18))  # rows, columns of the square the model looks at


class SquareModel:
    """Class 1's logit is the mean brightness inside EVIDENCE (NCHW input); records the batch sizes it is given."""

    def __init__(self, layout: str) -> None:
        self.layout = layout
        self.calls: list[int] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        nchw = np.moveaxis(batch, -1, 1) if self.layout == "NHWC" else batch
        evidence = 8.0 * nchw[:, :, EVIDENCE[0], EVIDENCE[1]].mean(axis=(1, 2, 3))
        logits = np.stack([np.zeros_like(evidence), evidence], axis=1)
        return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def _images(count: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    images = rng.random((count, 3, SIZE, SIZE)).astype(np.float32) * 0.2
    images[:, :, EVIDENCE[0], EVIDENCE[1]] = 1.0
    return images


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_the_map_peaks_on_the_evidence_in_either_layout(layout: str) -> None:
    images = _images(3)
    batch = np.moveaxis(images, 1, -1).copy() if layout == "NHWC" else images
    model = SquareModel(layout)
    maps = occlusion_maps(model, batch, layout, steps=6, chunk=16)
    assert maps.shape == (3, SIZE, SIZE) and maps.min() >= 0 and np.isclose(maps.max(), 1)
    inside = np.zeros((SIZE, SIZE), bool)
    inside[EVIDENCE] = True
    for heatmap in maps:
        assert inside[np.unravel_index(heatmap.argmax(), heatmap.shape)]
        assert heatmap[inside].mean() > 3 * heatmap[~inside].mean()
    assert sum(model.calls) == 3 + 3 * 36 and max(model.calls[1:]) <= 16


def test_both_layouts_give_the_same_maps() -> None:
    images = _images(2)
    nchw = occlusion_maps(SquareModel("NCHW"), images, "NCHW", steps=5)
    nhwc = occlusion_maps(SquareModel("NHWC"), np.moveaxis(images, 1, -1).copy(), "NHWC", steps=5)
    np.testing.assert_allclose(nchw, nhwc, atol=1e-6)


def test_a_model_no_patch_can_sway_gets_a_blank_map() -> None:
    def constant(batch: np.ndarray) -> np.ndarray:
        return np.tile([[0.3, 0.7]], (len(batch), 1))

    assert not occlusion_maps(constant, _images(2), "NCHW", steps=4).any()


@pytest.mark.parametrize(("size", "steps"), [(240, 7), (224, 7), (31, 4), (8, 8)])
def test_patches_cover_the_axis(size: int, steps: int) -> None:
    starts, length = patch_starts(size, steps)
    covered = np.zeros(size, bool)
    for start in starts:
        covered[start : start + length] = True
    assert len(starts) == steps and covered.all() and starts[-1] + length == size
