"""Out-of-distribution warning for MRI volumes: a Mahalanobis distance of a few volume descriptors, calibrated on
in-distribution studies (held-out synthetic cases at training, the validation folder at import).

The descriptors come from the model input after the card's preparation (model grid, z-scored channels) and from the
model's own output on it:
- `log_brain_ml`: log(1 + mL) of the voxels any channel has signal in. Skull-stripped brains are about 1-1.5 L; a
  head with scalp and background noise, a CT's air, a noise volume or a wrong voxel size is far off.
- `mean_max_softmax`: the model's mean confidence over those voxels.
- `outlier_fraction`: the share of channel values beyond 4 standard deviations (bone or air in HU, spikes).
- `corr_<a>_<b>`: the correlation of every pair of sequences over those voxels. Each sequence has its own tissue
  contrasts, so real multi-sequence studies have a typical pattern; one file sent as several sequences gives 1.
Measured against foreign inputs (docs/performance.md, bench/mri_ood.py), no single descriptor separates them all,
and their Mahalanobis distance (Ledoit-Wolf covariance) does. The threshold is the `coverage` percentile of the
leave-one-out distances of the calibration studies, so about (100 - coverage) % of in-distribution studies are
flagged. A volume with no signal at all has no descriptors and is always flagged.
"""

from __future__ import annotations

import itertools

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.volumes import voxel_volume_mm3

DEFAULT_VOLUME_COVERAGE = 97.5
OUTLIER_Z = 4.0
MIN_CALIBRATION_STUDIES = 10


def voxel_ml(affine: np.ndarray) -> float:
    """Volume of one voxel of a grid, in mL."""
    return voxel_volume_mm3(affine) / 1000.0


def descriptor_names(sequences: list[str] | tuple[str, ...]) -> list[str]:
    """The descriptor order for a model with these input sequences."""
    pairs = [f"corr_{a}_{b}" for a, b in itertools.combinations(sequences, 2)]
    return ["log_brain_ml", "mean_max_softmax", "outlier_fraction", *pairs]


def volume_descriptors(tensor: np.ndarray, probabilities: np.ndarray, voxel_ml: float) -> np.ndarray | None:
    """(C, X, Y, Z) prepared input and (K, X, Y, Z) probabilities on the same grid -> descriptors (None: no signal)."""
    brain = np.any(tensor != 0, axis=0)
    count = int(brain.sum())
    if count < 2:
        return None
    values = tensor[:, brain].astype(np.float64)
    confidence = float(probabilities[:, brain].max(axis=0).astype(np.float64).mean())
    outliers = float(np.mean(np.abs(values) > OUTLIER_Z))
    centred = values - values.mean(axis=1, keepdims=True)
    norms = np.sqrt((centred**2).sum(axis=1))
    correlations = [
        float(centred[a] @ centred[b] / (norms[a] * norms[b])) if norms[a] > 0 and norms[b] > 0 else 0.0
        for a, b in itertools.combinations(range(len(values)), 2)
    ]
    return np.array([np.log1p(count * voxel_ml), confidence, outliers, *correlations])


class VolumeOodCalibration(BaseModel):
    """Mean and precision of the in-distribution descriptors, and the distance beyond which a study is flagged."""

    model_config = ConfigDict(extra="forbid")

    score: str = Field(default="descriptor_mahalanobis", description="the only volume score so far")
    descriptors: list[str]
    mean: list[float]
    precision: list[list[float]] = Field(description="inverse of the Ledoit-Wolf covariance")
    threshold: float = Field(gt=0, description="distances above this are flagged")
    coverage: float = Field(gt=0, lt=100, description="percent of calibration studies (leave-one-out) not flagged")
    n_studies: int = Field(ge=MIN_CALIBRATION_STUDIES)

    @model_validator(mode="after")
    def _shapes(self) -> VolumeOodCalibration:
        n = len(self.descriptors)
        if len(self.mean) != n or len(self.precision) != n or any(len(row) != n for row in self.precision):
            raise ValueError("mean and precision must match the descriptors")
        return self

    def distance(self, descriptors: np.ndarray | None) -> float:
        """Mahalanobis distance of one study's descriptors (infinite when it had none)."""
        if descriptors is None:
            return float("inf")
        delta = np.asarray(descriptors, dtype=np.float64) - np.asarray(self.mean)
        return float(np.sqrt(max(delta @ np.asarray(self.precision) @ delta, 0.0)))

    def flags(self, descriptors: np.ndarray | None) -> bool:
        return not self.distance(descriptors) <= self.threshold


def _fit(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.covariance import LedoitWolf  # calibration only (training, import): not in every API worker

    estimator = LedoitWolf().fit(rows)
    return estimator.location_, estimator.precision_


def calibrate_volume_ood(
    rows: list[np.ndarray | None], names: list[str], coverage: float = DEFAULT_VOLUME_COVERAGE
) -> VolumeOodCalibration:
    """Fit on in-distribution descriptors (one row per study); threshold = `coverage` percentile of leave-one-out
    distances (each study measured against a fit without it, as a new study would be)."""
    if any(row is None for row in rows):
        raise ValueError("a calibration study has no signal")
    data = np.asarray(rows, dtype=np.float64)
    if len(data) < MIN_CALIBRATION_STUDIES:
        raise ValueError(f"OOD calibration needs at least {MIN_CALIBRATION_STUDIES} studies, got {len(data)}")
    left_out = []
    for index in range(len(data)):
        mean, precision = _fit(np.delete(data, index, axis=0))
        delta = data[index] - mean
        left_out.append(float(np.sqrt(max(delta @ precision @ delta, 0.0))))
    mean, precision = _fit(data)
    return VolumeOodCalibration(descriptors=names, mean=mean.tolist(), precision=precision.tolist(),
                                threshold=float(np.percentile(left_out, coverage)), coverage=coverage,
                                n_studies=len(data))
