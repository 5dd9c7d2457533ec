"""Small composable steps from a decoded slice to a model's input tensor, as the model card says.

The same `prepare_slice` is used by training_export when it trains and by the service when it serves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from monai.transforms import Resize

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


def resize(chw: np.ndarray, spec: ImageInputSpec) -> np.ndarray:
    """(C, H, W) -> (C, height, width) with the card's filter."""
    if chw.shape[1:] == (spec.height, spec.width):
        return chw
    mode = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest", "area": "area"}[spec.resize_filter]
    return np.asarray(Resize((spec.height, spec.width), mode=mode)(chw), dtype=np.float32)


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
