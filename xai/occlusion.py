"""Occlusion sensitivity (Zeiler & Fergus 2014): how much hiding each patch lowers the top class's probability.

Model-agnostic: it needs only a batched `predict`, so it explains imported ONNX models that have no differentiable
weights. A grid of `steps × steps` overlapping patches (each about two grid steps wide) is filled with the image's
own per-channel mean, so one explained image costs exactly `steps²` extra forward passes, run in chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np

from xai.render import normalise_per_image

DEFAULT_STEPS = 7
DEFAULT_CHUNK = 32
Predict = Callable[[np.ndarray], np.ndarray]


def patch_starts(size: int, steps: int) -> tuple[np.ndarray, int]:
    """Start offsets of `steps` patches along an axis of `size` pixels and the patch length; together they cover it."""
    length = min(size, int(np.ceil(2 * size / (steps + 1))))
    return np.linspace(0, size - length, steps).round().astype(int), length


def _boxes(height: int, width: int, steps: int) -> list[tuple[slice, slice]]:
    (rows, row_length), (cols, col_length) = patch_starts(height, steps), patch_starts(width, steps)
    return [(slice(r, r + row_length), slice(c, c + col_length)) for r in rows for c in cols]


def _occluded(nchw: np.ndarray, boxes: list[tuple[slice, slice]], chunk: int) -> Iterator[np.ndarray]:
    """Chunks of (C, H, W) copies, image by image and box by box, each with one box filled by its image's
    per-channel mean: N × len(boxes) copies in all, never more than `chunk` in memory."""
    fills = nchw.mean(axis=(2, 3), keepdims=True)
    jobs = [(image, box) for image in range(len(nchw)) for box in boxes]
    for start in range(0, len(jobs), chunk):
        part = jobs[start : start + chunk]
        copies = nchw[[image for image, _ in part]].astype(np.float32)
        for copy, (image, (rows, cols)) in zip(copies, part):
            copy[:, rows, cols] = fills[image]
        yield copies


def occlusion_maps(
    predict: Predict,
    batch: np.ndarray,
    layout: Literal["NCHW", "NHWC"],
    steps: int = DEFAULT_STEPS,
    chunk: int = DEFAULT_CHUNK,
) -> np.ndarray:
    """Prepared batch in the model's layout -> (N, H, W) maps in [0, 1] for each image's top class.

    A pixel's value is the mean probability drop of the patches covering it (rises count as zero), scaled per
    image to [0, 1] by its own min and max; an image no patch can sway gets an all-zero map.
    """
    nchw = np.moveaxis(batch, -1, 1) if layout == "NHWC" else batch
    height, width = nchw.shape[2:]
    boxes = _boxes(height, width, steps)
    base = predict(batch)
    index, top = np.arange(len(nchw)), base.argmax(axis=1)
    outputs = [
        predict(np.ascontiguousarray(np.moveaxis(copies, 1, -1) if layout == "NHWC" else copies))
        for copies in _occluded(nchw, boxes, chunk)
    ]
    occluded = np.concatenate(outputs).reshape(len(nchw), len(boxes), -1)
    drops = np.maximum(base[index, top][:, None] - occluded[index, :, top], 0.0)  # (N, boxes)
    maps = np.zeros((len(nchw), height, width), np.float32)
    coverage = np.zeros((height, width), np.float32)
    for box, (rows, cols) in enumerate(boxes):
        maps[:, rows, cols] += drops[:, box, None, None]
        coverage[rows, cols] += 1.0
    return normalise_per_image(maps / coverage)
