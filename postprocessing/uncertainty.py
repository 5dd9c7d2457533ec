"""Voxel-wise uncertainty by test-time augmentation: the model runs on the volume mirrored along every combination of
its three axes (8 passes, the first unmirrored), each output mirrored back.

- The voxel map is the normalised predictive entropy of the passes' mean softmax: 0 when every pass is sure of the
  same class, 1 when the classes are equally likely.
- A region's volume interval is the 5th-95th percentile of its volume across the passes, widened on both sides by
  the card's calibrated margin (a share of the passes' median volume, chosen at training so the interval covered
  the true volume of `coverage` % of calibration cases: split-conformal, Romano et al. 2019).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
from core.cards.segmentation import SegmentationCard

FLIPS: tuple[tuple[int, ...], ...] = tuple(
    axes for size in range(4) for axes in itertools.combinations((1, 2, 3), size)
)
"""Spatial axes of a (C, X, Y, Z) volume mirrored in each pass; () is the plain pass."""
INTERVAL_PERCENTILES = (5.0, 95.0)


def flip_passes(segment: Callable[[np.ndarray, int], np.ndarray], volume: np.ndarray) -> np.ndarray:
    """(C, X, Y, Z) -> (passes, K, X, Y, Z) float16: `segment(mirrored volume, pass index)` mirrored back."""
    outputs = []
    for index, axes in enumerate(FLIPS):
        mirrored = np.ascontiguousarray(np.flip(volume, axes)) if axes else volume
        output = segment(mirrored, index)
        outputs.append(np.flip(output, axes) if axes else output)
    return np.stack(outputs).astype(np.float16)


def normalised_entropy(passes: np.ndarray) -> np.ndarray:
    """(passes, K, X, Y, Z) probabilities -> (X, Y, Z) float32 entropy of their mean, divided by log K."""
    mean = passes.astype(np.float32).mean(axis=0)
    entropy = -(mean * np.log(np.clip(mean, 1e-7, 1.0))).sum(axis=0)
    return np.clip(entropy / np.log(len(mean)), 0.0, 1.0).astype(np.float32)


def region_channels(card: SegmentationCard) -> dict[str, list[int]]:
    """BraTS region -> the output channels it is made of."""
    return {region: [label.channel for label in card.labels if label.value in values]
            for region, values in card.region_values().items()}


def pass_region_volumes(passes: np.ndarray, card: SegmentationCard, voxel_ml: float) -> dict[str, np.ndarray]:
    """Region -> (passes,) volume in mL of each pass's argmax mask."""
    labels = passes.argmax(axis=1)
    return {region: np.isin(labels, channels).sum(axis=(1, 2, 3)) * voxel_ml
            for region, channels in region_channels(card).items()}


def volume_interval(volumes: np.ndarray, margin: float) -> tuple[float, float]:
    """The passes' 5th-95th percentile volume widened by `margin` x their median (never below 0)."""
    low, high = np.percentile(volumes, INTERVAL_PERCENTILES)
    widen = margin * float(np.median(volumes))
    return max(float(low) - widen, 0.0), float(high) + widen


def interval_margin(volumes: list[np.ndarray], truths: list[float], coverage: float) -> float:
    """Split-conformal margin: the smallest share of the median volume that, added on both sides of each case's raw
    interval, covers the true volume of `coverage` % of the cases (finite-sample corrected)."""
    scores = []
    for case_volumes, truth in zip(volumes, truths):
        low, high = np.percentile(case_volumes, INTERVAL_PERCENTILES)
        scores.append(max(low - truth, truth - high, 0.0) / max(float(np.median(case_volumes)), 1e-6))
    level = min(1.0, np.ceil((len(scores) + 1) * coverage / 100.0) / len(scores))
    return float(np.quantile(scores, level, method="higher"))
