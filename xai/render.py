"""Heatmaps normalised and in the input's pixel geometry, colour maps, overlays and PNG data URLs.

matplotlib (its colour maps) is imported on the first colourised map, not by every process that imports this.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

DEFAULT_COLORMAP = "jet"
OVERLAY_ALPHA = 0.4


def png_data_url(pixels: np.ndarray) -> str:
    """uint8 (H, W) or (H, W, 3) -> `data:image/png;base64,...`."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def to_source_geometry(heatmap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a [0, 1] map from model resolution to the source image's (rows, columns), bilinear."""
    if heatmap.shape == shape:
        return heatmap.astype(np.float32, copy=False)
    resized = Image.fromarray(heatmap.astype(np.float32), mode="F").resize((shape[1], shape[0]), Image.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def normalise_per_image(maps: np.ndarray) -> np.ndarray:
    """Scale each map to [0, 1] by its own min and max (a flat map becomes all zeros)."""
    flat = maps.reshape(len(maps), -1)
    low = flat.min(axis=1)[:, None, None]
    span = (flat.max(axis=1) - flat.min(axis=1))[:, None, None]
    return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)


def colorize(heatmap: np.ndarray, colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
    """[0, 1] map -> RGB uint8 through a matplotlib colour map."""
    from matplotlib import colormaps  # the registry only: no backend, no pyplot

    if colormap not in colormaps:
        raise ValueError(f"unknown colour map {colormap!r}")
    return (colormaps[colormap](heatmap)[..., :3] * 255).astype(np.uint8)


def overlay(display: np.ndarray, heatmap: np.ndarray, colormap: str = DEFAULT_COLORMAP, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Blend the coloured heatmap over the grey [0, 1] image: (1 - alpha) * image + alpha * colour, RGB uint8."""
    grey = np.repeat((np.clip(display, 0.0, 1.0) * 255)[..., None], 3, axis=-1)
    return ((1.0 - alpha) * grey + alpha * colorize(heatmap, colormap)).astype(np.uint8)
