"""Label masks from class probabilities, and their clean-up: small-object removal and boundary smoothing."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
SMOOTHING_SIGMA_VOXELS = 1.0
_MARGIN_VOXELS = 3


class PostProcessingOptions(BaseModel):
    """The request's `post_processing` field."""

    model_config = ConfigDict(extra="forbid", strict=True)  # booleans and integers as declared (not 0, "5" or 5.0)

    remove_small_objects: bool = True
    min_area_pixels: int = Field(
        default=100, ge=0, le=10_000_000,
        description="tumour components (26-connected, in the input's voxels) smaller than this are removed",
    )
    smooth_boundaries: bool = False


def labels_from_probabilities(probabilities: np.ndarray, channel_values: Sequence[int]) -> np.ndarray:
    """(C, X, Y, Z) class probabilities -> (X, Y, Z) uint8 mask of each voxel's most likely class's value."""
    return np.asarray(channel_values, dtype=np.uint8)[np.argmax(probabilities, axis=0)]


def remove_small_components(labels: np.ndarray, min_voxels: int) -> np.ndarray:
    """Erase tumour components (all labels together, 26-connectivity) with fewer than `min_voxels` voxels."""
    components, count = ndimage.label(labels > 0, structure=FULL_CONNECTIVITY)
    if count == 0 or min_voxels <= 1:
        return labels
    sizes = np.bincount(components.ravel())
    small = sizes < min_voxels
    small[0] = False
    return np.where(small[components], np.uint8(0), labels).astype(np.uint8)


def smooth_label_boundaries(labels: np.ndarray, sigma_voxels: float = SMOOTHING_SIGMA_VOXELS) -> np.ndarray:
    """Each voxel near the tumour takes the label whose Gaussian-smoothed indicator is largest there."""
    tumour = np.argwhere(labels > 0)
    if len(tumour) == 0:
        return labels
    margin = int(np.ceil(3 * sigma_voxels)) + _MARGIN_VOXELS
    box = tuple(slice(max(0, int(lo) - margin), int(hi) + margin + 1) for lo, hi in zip(tumour.min(0), tumour.max(0)))
    region = labels[box]
    values = np.unique(np.concatenate([[0], np.unique(region)]))
    smoothed = np.stack([ndimage.gaussian_filter((region == v).astype(np.float32), sigma_voxels) for v in values])
    result = labels.copy()
    result[box] = values.astype(np.uint8)[np.argmax(smoothed, axis=0)]
    return result


def clean_mask(labels: np.ndarray, options: PostProcessingOptions) -> np.ndarray:
    """The requested clean-up: smoothing first (it can split thin parts), then small-object removal."""
    if options.smooth_boundaries:
        labels = smooth_label_boundaries(labels)
    if options.remove_small_objects:
        labels = remove_small_components(labels, options.min_area_pixels)
    return labels
