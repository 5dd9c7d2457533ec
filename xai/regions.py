"""Important regions: boxes around connected areas of a normalised heatmap above a threshold, largest first."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from core.schemas import ImportantRegion

REGION_THRESHOLD = 0.7
REGION_MIN_AREA_PX = 100


def important_regions(
    heatmap: np.ndarray, threshold: float = REGION_THRESHOLD, min_area_px: int = REGION_MIN_AREA_PX
) -> list[ImportantRegion]:
    """Connected areas (8-connectivity) of `heatmap >= threshold` with at least `min_area_px` pixels."""
    labels, count = ndimage.label(heatmap >= threshold, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    areas = ndimage.sum_labels(np.ones_like(heatmap), labels, index)
    means = ndimage.mean(heatmap, labels, index)
    regions = []
    for label_index, box in enumerate(ndimage.find_objects(labels)):
        if areas[label_index] < min_area_px:
            continue
        rows, cols = box
        region = ImportantRegion(
            x=cols.start, y=rows.start, width=cols.stop - cols.start, height=rows.stop - rows.start,
            importance=round(float(means[label_index]), 4),
        )
        regions.append((areas[label_index], region))
    return [region for _, region in sorted(regions, key=lambda pair: -pair[0])]
