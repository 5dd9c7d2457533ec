"""Tumour measurements from a label mask and its own affine: volumes per label and region, centroid, bounding box."""

from __future__ import annotations

import itertools

import numpy as np

from core.cards.segmentation import SegmentationCard
from core.schemas import BoundingBox, LabelStatistics, TumorLocation, TumorVolume
from core.volumes import voxel_volume_mm3

MM3_PER_ML = 1000.0


def to_mm(affine: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    """(N, 3) voxel indices -> (N, 3) world millimetres."""
    return voxels @ affine[:3, :3].T + affine[:3, 3]


def label_statistics(labels: np.ndarray, affine: np.ndarray, card: SegmentationCard) -> list[LabelStatistics]:
    """Voxel count, volume (mm3, mL) and share of the tumour of every tumour label the card names."""
    counts = np.bincount(labels.ravel(), minlength=256)
    voxel_mm3 = voxel_volume_mm3(affine)
    tumour_voxels = int(sum(counts[label.value] for label in card.tumor_labels()))
    return [
        LabelStatistics(
            label=label.name, value=label.value, voxel_count=int(counts[label.value]),
            volume_mm3=round(float(counts[label.value]) * voxel_mm3, 3),
            volume_ml=round(float(counts[label.value]) * voxel_mm3 / MM3_PER_ML, 4),
            fraction_of_tumor=round(float(counts[label.value]) / tumour_voxels, 4) if tumour_voxels else 0.0,
        )
        for label in card.tumor_labels()
    ]


def tumor_volume(statistics: list[LabelStatistics], card: SegmentationCard) -> TumorVolume:
    """Total, per-label and per-region (WT, TC, ET) volumes in mL."""
    by_value = {s.value: s.volume_mm3 for s in statistics}
    regions = {name: round(sum(by_value.get(v, 0.0) for v in values) / MM3_PER_ML, 4)
               for name, values in card.region_values().items()}
    return TumorVolume(
        total=round(sum(by_value.values()) / MM3_PER_ML, 4),
        by_label={s.label: s.volume_ml for s in statistics},
        regions=regions,
    )


def location_and_box(labels: np.ndarray, affine: np.ndarray) -> tuple[TumorLocation, BoundingBox] | None:
    """Centroid and inclusive bounding box of all tumour voxels (voxel indices and RAS mm); None without tumour."""
    indices = np.argwhere(labels > 0)
    if len(indices) == 0:
        return None
    centroid = indices.mean(axis=0)
    low, high = indices.min(axis=0), indices.max(axis=0)
    corners = np.array(list(itertools.product(*zip(low, high))), dtype=np.float64)
    corners_mm = to_mm(affine, corners)
    centroid_mm = to_mm(affine, centroid[None])[0]
    location = TumorLocation(
        centroid_x=round(float(centroid[0]), 3), centroid_y=round(float(centroid[1]), 3),
        centroid_z=round(float(centroid[2]), 3), centroid_mm=tuple(round(float(v), 3) for v in centroid_mm),
    )
    box = BoundingBox(
        min_x=int(low[0]), min_y=int(low[1]), min_z=int(low[2]), max_x=int(high[0]), max_y=int(high[1]),
        max_z=int(high[2]), min_mm=tuple(round(float(v), 3) for v in corners_mm.min(axis=0)),
        max_mm=tuple(round(float(v), 3) for v in corners_mm.max(axis=0)),
    )
    return location, box
