"""Test-time-augmentation uncertainty: passes mirrored back, entropy, volume intervals and their conformal margin."""

from __future__ import annotations

import numpy as np
import pytest

from postprocessing.uncertainty import (
    FLIPS,
    flip_passes,
    interval_margin,
    normalised_entropy,
    pass_region_volumes,
    volume_interval,
)
from tests.unit.mri.mri_inputs import card


def test_every_pass_is_mirrored_back_onto_the_input_grid() -> None:
    volume = np.random.default_rng(0).standard_normal((4, 6, 5, 4)).astype(np.float32)
    seen = []

    def segment(mirrored: np.ndarray, index: int) -> np.ndarray:
        seen.append(index)
        return np.stack([mirrored[0], mirrored[1], mirrored[2], mirrored[3]])  # position-dependent "model"

    passes = flip_passes(segment, volume)
    assert passes.shape == (8, 4, 6, 5, 4) and passes.dtype == np.float16 and seen == list(range(8))
    assert len(set(FLIPS)) == 8 and FLIPS[0] == ()
    for output in passes:
        np.testing.assert_allclose(output, volume, atol=1e-2)


def test_entropy_is_zero_when_passes_agree_and_one_when_uniform() -> None:
    sure = np.zeros((8, 4, 2, 2, 2), np.float16)
    sure[:, 1] = 1
    assert normalised_entropy(sure).max() == pytest.approx(0, abs=1e-5)
    split = sure.copy()
    split[4:, 1], split[4:, 2] = 0, 1  # half the passes say another class
    assert normalised_entropy(split).min() == pytest.approx(0.5, abs=1e-3)
    assert normalised_entropy(np.full((8, 4, 2, 2, 2), 0.25, np.float16)).min() == pytest.approx(1.0, abs=1e-3)


def test_region_volumes_per_pass_and_widened_interval() -> None:
    passes = np.zeros((8, 4, 10, 10, 10), np.float16)
    passes[:, 0] = 1
    for k in range(8):
        passes[k, 0, :k + 1], passes[k, 2, :k + 1] = 0, 1  # oedema in k + 1 slabs of 100 voxels
    volumes = pass_region_volumes(passes, card(), voxel_ml=0.01)
    np.testing.assert_allclose(volumes["WT"], np.arange(1, 9))
    assert volumes["TC"].max() == 0 and volumes["ET"].max() == 0
    low, high = volume_interval(volumes["WT"], margin=0.0)
    expected = np.percentile(np.arange(1, 9), [5, 95])
    assert (low, high) == pytest.approx(tuple(expected))
    wide = volume_interval(volumes["WT"], margin=0.5)
    assert wide == pytest.approx((max(low - 2.25, 0.0), high + 2.25))


def test_conformal_margin_covers_the_requested_share_of_cases() -> None:
    rng = np.random.default_rng(2)
    truths = rng.uniform(10, 100, 200)
    volumes = [truth * (1 + rng.normal(0.05, 0.1)) + rng.normal(0, 0.5, 8) for truth in truths]  # biased, too narrow
    raw = np.mean([volume_interval(v, 0.0)[0] <= t <= volume_interval(v, 0.0)[1] for v, t in zip(volumes, truths)])
    margin = interval_margin(volumes[:100], list(truths[:100]), coverage=90.0)
    covered = np.mean([volume_interval(v, margin)[0] <= t <= volume_interval(v, margin)[1]
                       for v, t in zip(volumes[100:], truths[100:])])
    assert raw < 0.3 and margin > 0 and covered >= 0.8
