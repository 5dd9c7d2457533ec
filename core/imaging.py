"""Decoded images: pixels together with their geometry and where they came from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

IntensityKind = Literal["hounsfield", "display", "raw"]
"""hounsfield: CT values after Rescale Slope/Intercept; display: already windowed (PNG/JPEG, 0..max_value);
raw: scanner units without a physical scale (MR), windowed with the file's VOI window or percentiles."""


@dataclass(frozen=True)
class ImageSource:
    """Where a decoded image came from (no patient identifiers)."""

    format: Literal["dicom", "png", "jpeg"]
    modality: str | None = None
    transfer_syntax: str | None = None
    photometric: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None


@dataclass(frozen=True)
class DecodedSlice:
    """One 2D image as float32 pixels, (H, W) grey or (H, W, 3) RGB, in the source's own pixel grid."""

    pixels: np.ndarray
    intensity: IntensityKind
    source: ImageSource
    max_value: float = 255.0
    pixel_spacing_mm: tuple[float, float] | None = None
    voi_window: tuple[float, float] | None = None
    slice_thickness_mm: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the source image: the geometry heatmaps and overlays are returned in."""
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])
