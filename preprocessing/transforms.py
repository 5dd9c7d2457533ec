"""Small composable steps from a decoded slice to a model's input tensor, as the model card says.

The same `prepare_slice` is used by training_export when it trains and by the service when it serves. It needs
numpy only (no torch), so an API worker that prepares slices does not load torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from functools import lru_cache

import numpy as np

from core.cards.classification import ImageInputSpec
from core.imaging import DecodedSlice

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_RAW_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class PreparedSlice:
    """A model-ready tensor and the unit-range grey image, in the source geometry, to draw explanations on."""

    tensor: np.ndarray
    display: np.ndarray


def window_to_unit(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map a display window [center - width/2, center + width/2] onto [0, 1], clipping outside it."""
    low = center - width / 2.0
    return np.clip((values - low) / width, 0.0, 1.0).astype(np.float32)


def to_unit_range(image: DecodedSlice, spec: ImageInputSpec) -> np.ndarray:
    """Intensities in [0, 1]: CT through the card's HU clip and window, MR through its VOI window, PNG/JPEG by range."""
    pixels = image.pixels.astype(np.float32, copy=False)
    if image.intensity == "hounsfield":
        if spec.hu_clip is not None:
            pixels = np.clip(pixels, *spec.hu_clip)
        return window_to_unit(pixels, spec.ct_window.center, spec.ct_window.width)
    if image.intensity == "raw":
        if image.voi_window is not None:
            return window_to_unit(pixels, *image.voi_window)
        low, high = np.percentile(pixels, _RAW_PERCENTILES)
        return window_to_unit(pixels, (low + high) / 2.0, max(float(high - low), 1e-6))
    return np.clip(pixels / image.max_value, 0.0, 1.0).astype(np.float32)


def to_channels(unit: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) or (H, W, 3) -> (C, H, W) with the card's channel count (grey replicated, RGB to luminance)."""
    if unit.ndim == 3:
        grey_or_rgb = unit if channels == 3 else (unit @ _LUMA)[..., None]
    else:
        grey_or_rgb = np.repeat(unit[..., None], channels, axis=-1)
    return np.ascontiguousarray(np.moveaxis(grey_or_rgb, -1, 0), dtype=np.float32)


_CUBIC_A = -0.75
"""The cubic convolution coefficient torch (and so MONAI's Resize) uses for bicubic."""


def _cubic(distance: np.ndarray) -> np.ndarray:
    d = np.abs(distance)
    near = ((_CUBIC_A + 2) * d - (_CUBIC_A + 3)) * d * d + 1
    far = ((_CUBIC_A * d - 5 * _CUBIC_A) * d + 8 * _CUBIC_A) * d - 4 * _CUBIC_A
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


@lru_cache(maxsize=64)
def _taps(n_in: int, n_out: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights, both (n_out, taps), of a 1D resize as torch's `interpolate` computes it
    (align_corners=False, no anti-aliasing: what MONAI's `Resize` did here before, and what the models were trained
    on); a 2D resize is this along each axis."""
    scale = np.float32(n_in / n_out)  # torch computes source positions in float32: so do we, to match it
    out = np.arange(n_out, dtype=np.float32)
    if mode == "nearest":
        return np.minimum(np.floor(out * scale), n_in - 1).astype(np.intp)[:, None], np.ones((n_out, 1))
    if mode == "area":
        cells = np.arange(n_out + 1)
        start, end = cells[:-1] * n_in // n_out, -(-cells[1:] * n_in // n_out)
        taps = int((end - start).max())
        index = start[:, None] + np.arange(taps)
        inside = index < end[:, None]
        return np.minimum(index, n_in - 1), inside / inside.sum(axis=1, keepdims=True)
    source = (out + np.float32(0.5)) * scale - np.float32(0.5)
    if mode == "bilinear":
        source = np.maximum(source, np.float32(0.0))
        low = np.floor(source).astype(np.intp)
        high = np.minimum(low + 1, n_in - 1)
        frac = source - low
        return np.stack([low, high], axis=1), np.stack([1.0 - frac, frac], axis=1)
    low = np.floor(source).astype(np.intp)
    offsets = np.arange(-1, 3)
    index = low[:, None] + offsets
    return np.clip(index, 0, n_in - 1), _cubic(source[:, None] - index)


def _resize_axis(values: np.ndarray, axis: int, n_out: int, mode: str) -> np.ndarray:
    index, weight = _taps(values.shape[axis], n_out, mode)
    shape = [1] * values.ndim
    shape[axis] = n_out
    out = np.zeros(values.shape[:axis] + (n_out,) + values.shape[axis + 1:], np.float32)
    for tap in range(index.shape[1]):
        out += values.take(index[:, tap], axis=axis) * weight[:, tap].astype(np.float32).reshape(shape)
    return out


def resize(chw: np.ndarray, spec: ImageInputSpec) -> np.ndarray:
    """(C, H, W) -> (C, height, width) with the card's filter (torch's `interpolate` semantics, computed in numpy)."""
    if chw.shape[1:] == (spec.height, spec.width):
        return chw
    rows = _resize_axis(chw.astype(np.float32, copy=False), 1, spec.height, spec.resize_filter)
    return _resize_axis(rows, 2, spec.width, spec.resize_filter)


def scale(chw: np.ndarray, spec: ImageInputSpec) -> np.ndarray:
    """Apply the card's value scaling to a [0, 1] tensor."""
    if spec.scaling == "symmetric":
        return chw * 2.0 - 1.0
    if spec.scaling == "mean_std":
        mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
        return ((chw - mean) / std).astype(np.float32)
    return chw


def to_layout(chw: np.ndarray, spec: ImageInputSpec) -> np.ndarray:
    """(C, H, W) -> the card's layout (NHWC models get (H, W, C))."""
    return np.ascontiguousarray(np.moveaxis(chw, 0, -1)) if spec.layout == "NHWC" else chw


def prepare_slice(image: DecodedSlice, spec: ImageInputSpec) -> PreparedSlice:
    """Decoded slice -> model tensor (without the batch axis) plus the display image for overlays."""
    unit = to_unit_range(image, spec)
    tensor = to_layout(scale(resize(to_channels(unit, spec.channels), spec), spec), spec)
    display = unit if unit.ndim == 2 else unit @ _LUMA
    return PreparedSlice(tensor=tensor.astype(np.float32, copy=False), display=display.astype(np.float32, copy=False))
