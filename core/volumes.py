"""Decoded MRI volumes: voxels together with their geometry (affine, spacing) and where each sequence came from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset

VolumeFormat = Literal["nifti", "dicom"]



def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume of one voxel of the grid with this voxel-to-world affine, in mm³."""
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3])))

@dataclass(frozen=True)
class SeriesSource:
    """Where one sequence came from (no patient identifiers).

    `headers` are the DICOM series' de-identified headers without pixel data, in slice order (empty for NIfTI):
    a DICOM SEG references them.
    """

    sequence: str
    format: VolumeFormat
    file_name: str | None = None
    series_uid: str | None = None
    description: str | None = None
    matched_by: Literal["sequence_type", "description", "acquisition_tags", "only_sequence", "volume_order"] = "sequence_type"
    slices: int = 1
    transfer_syntax: str | None = None
    headers: tuple[Dataset, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class DecodedVolume:
    """Co-registered sequences as float32 (C, X, Y, Z) in one voxel grid.

    `affine` maps voxel indices (x, y, z) to RAS+ millimetres (the NIfTI world convention). Every channel shares
    it; a sequence sent on another grid is resampled onto the reference sequence's grid when decoded.
    """

    data: np.ndarray
    affine: np.ndarray
    sequences: tuple[str, ...]
    sources: tuple[SeriesSource, ...]
    reference_sequence: str

    def __post_init__(self) -> None:
        if self.data.ndim != 4 or self.data.shape[0] != len(self.sequences):
            raise ValueError(f"data {self.data.shape} must be (C, X, Y, Z) with one channel per sequence")
        if self.affine.shape != (4, 4):
            raise ValueError("affine must be 4x4")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(X, Y, Z) voxels of the grid."""
        return tuple(int(n) for n in self.data.shape[1:])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return voxel_spacing(self.affine)

    @property
    def voxel_volume_mm3(self) -> float:
        return voxel_volume_mm3(self.affine)

    @property
    def format(self) -> VolumeFormat:
        """The reference sequence's format: the mask's grid (and a DICOM SEG's source series) is that sequence's."""
        return self.source_of(self.reference_sequence).format

    def source_of(self, sequence: str) -> SeriesSource:
        return next(source for source in self.sources if source.sequence == sequence)


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along each array axis in mm: the lengths of the affine's first three columns."""
    return tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))  # type: ignore[return-value]


@dataclass(frozen=True)
class RawSeries:
    """One decoded 3D series or NIfTI volume before it is matched to a sequence: (X, Y, Z) float32 and RAS+ affine.

    `acquisition` holds what sequence rules may test: RepetitionTime, EchoTime, InversionTime (ms) and
    `contrast` (1.0 when a contrast agent is recorded).
    """

    data: np.ndarray
    affine: np.ndarray
    format: VolumeFormat
    file_name: str | None = None
    series_uid: str | None = None
    description: str | None = None
    acquisition: dict[str, float] = field(default_factory=dict)
    transfer_syntax: str | None = None
    headers: tuple[Dataset, ...] = field(default=(), repr=False)

    @property
    def voxels(self) -> int:
        return int(self.data.size)


def resample_to_grid(
    data: np.ndarray, affine: np.ndarray, target_affine: np.ndarray, target_shape: Sequence[int], mode: str
) -> np.ndarray:
    """(C, X, Y, Z) on `affine` -> (C, *target_shape) on `target_affine` (MONAI SpatialResample; zeros outside)."""
    import torch  # imported here: API workers that never resample a volume stay free of torch and MONAI
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    image = MetaTensor(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), affine=torch.as_tensor(affine))
    resampled = SpatialResample(mode=mode, padding_mode="zeros", dtype=torch.float32)(
        image, dst_affine=torch.as_tensor(target_affine), spatial_size=tuple(int(n) for n in target_shape)
    )
    return resampled.numpy()
