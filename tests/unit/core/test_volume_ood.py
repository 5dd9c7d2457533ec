"""The MRI volume OOD check: descriptors, leave-one-out calibration, flags."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from core.volume_ood import (
    VolumeOodCalibration,
    calibrate_volume_ood,
    descriptor_names,
    volume_descriptors,
    voxel_ml,
)


def test_descriptors_of_a_volume_and_of_nothing() -> None:
    rng = np.random.default_rng(0)
    tensor = np.zeros((2, 10, 10, 10), np.float32)
    tensor[0, 2:8, 2:8, 2:8] = rng.standard_normal((6, 6, 6))
    tensor[1, 2:8, 2:8, 2:8] = -tensor[0, 2:8, 2:8, 2:8]
    probabilities = np.full((4, 10, 10, 10), 0.25, np.float16)
    probabilities[0, 2:8] = 0.7
    values = volume_descriptors(tensor, probabilities, voxel_ml=0.5)
    assert descriptor_names(["A", "B"]) == ["log_brain_ml", "mean_max_softmax", "outlier_fraction", "corr_A_B"]
    np.testing.assert_allclose(values, [np.log1p(216 * 0.5), 0.7, 0.0, -1.0], atol=1e-3)
    assert volume_descriptors(np.zeros((2, 4, 4, 4)), probabilities[:, :4, :4, :4], 1.0) is None
    assert voxel_ml(np.diag([2.0, -2.0, 3.0, 1.0])) == pytest.approx(0.012)


def test_calibration_threshold_is_a_leave_one_out_percentile_and_flags_far_studies() -> None:
    rng = np.random.default_rng(1)
    rows = list(rng.normal([7.0, 0.95, 0.001, 0.5], [0.1, 0.01, 0.0005, 0.05], size=(60, 4)))
    calibration = calibrate_volume_ood(rows, descriptor_names(["A", "B"]), coverage=90.0)
    inside = np.mean([calibration.flags(row) for row in rows])
    assert 0.0 < inside <= 0.15  # in-sample distances are smaller than the left-out ones the threshold came from
    fresh = rng.normal([7.0, 0.95, 0.001, 0.5], [0.1, 0.01, 0.0005, 0.05], size=(400, 4))
    assert np.mean([calibration.flags(row) for row in fresh]) == pytest.approx(0.1, abs=0.06)
    assert calibration.flags(np.array([9.0, 0.95, 0.001, 0.5])) and calibration.flags(None)
    assert calibration.distance(None) == float("inf")


def test_calibration_needs_enough_studies_with_signal_and_matching_shapes() -> None:
    rows = [np.ones(4) + i for i in range(5)]
    with pytest.raises(ValueError, match="at least 10"):
        calibrate_volume_ood(rows, descriptor_names(["A", "B"]))
    with pytest.raises(ValueError, match="no signal"):
        calibrate_volume_ood([*rows, None], descriptor_names(["A", "B"]))
    with pytest.raises(ValidationError, match="match the descriptors"):
        VolumeOodCalibration(descriptors=["a", "b"], mean=[0.0], precision=[[1.0]], threshold=1, coverage=95,
                             n_studies=10)
