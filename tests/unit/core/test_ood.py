"""The OOD score and its calibrated interval: energy on logits, 1 − max p on probabilities, both tails flagged."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from core.cards import ClassificationCard
from core.ood import (
    OOD_WARNING,
    OodCalibration,
    calibrate_ood,
    ood_scores,
    ood_warnings,
)


def test_energy_and_max_softmax_scores() -> None:
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(ood_scores(logits, "logits"), -np.log(np.exp(logits).sum(axis=1)), rtol=1e-6)
    probabilities = np.array([[0.9, 0.1], [0.5, 0.5]])
    np.testing.assert_allclose(ood_scores(probabilities, "probabilities"), [0.1, 0.5], rtol=1e-6)


def test_the_interval_holds_the_central_coverage_of_in_distribution_scores() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2000, 4)) * 2
    calibration = calibrate_ood(logits, "logits", coverage=90.0)
    scores = ood_scores(logits, "logits")
    flagged = np.array([calibration.flags(float(s)) for s in scores])
    assert calibration.score == "energy" and calibration.n_images == 2000
    assert flagged.mean() == pytest.approx(0.10, abs=0.01)
    assert (scores[flagged] < calibration.low).mean() == pytest.approx(0.5, abs=0.05)  # both tails


def test_warnings_only_outside_a_calibrated_interval() -> None:
    calibration = OodCalibration(score="max_softmax", low=0.2, high=0.6, coverage=95, n_images=10)
    assert ood_warnings(0.4, calibration) == []
    assert ood_warnings(0.1, calibration) == ood_warnings(0.7, calibration) == [OOD_WARNING]
    assert ood_warnings(0.99, None) == []


def test_calibration_needs_images_and_cards_reject_bad_intervals() -> None:
    with pytest.raises(ValueError, match="at least one"):
        calibrate_ood(np.zeros((0, 4)), "logits")
    card = {"name": "m", "intended_use": "x", "provenance": {"source": "s", "synthetic_data": True},
            "labels": ["Glioma", "No Tumor"]}
    with pytest.raises(ValidationError, match="coverage"):
        ClassificationCard.model_validate({**card, "ood": {"score": "energy", "low": -5, "high": -1, "coverage": 100,
                                                           "n_images": 3}})
    stored = ClassificationCard.model_validate({**card, "ood": calibrate_ood(np.eye(2) * 3, "logits").model_dump()})
    assert stored.ood is not None and stored.ood.low <= stored.ood.high


def test_mean_logit_and_max_softmax_scores_on_logits():
    logits = np.array([[-1.0, -3.0], [-5.0, -7.0]])
    np.testing.assert_allclose(ood_scores(logits, "logits", "mean_logit"), [2.0, 6.0], rtol=1e-6)
    np.testing.assert_allclose(ood_scores(logits, "logits", "max_softmax"), 1 - 1 / (1 + np.exp(-2.0)), rtol=1e-6)
    calibration = calibrate_ood(logits, "logits", score="mean_logit")
    assert calibration.score == "mean_logit" and calibration.low < calibration.high
    with pytest.raises(ValueError, match="needs a model that outputs logits"):
        ood_scores(np.array([[0.9, 0.1]]), "probabilities", "mean_logit")


def test_a_score_is_placed_on_the_calibration_s_scale() -> None:
    calibration = OodCalibration(score="energy", low=-12.0, high=-2.0, coverage=95.0, n_images=100)
    assert [calibration.relative(s) for s in (-12.0, -7.0, -2.0, -22.0)] == [0.0, 0.5, 1.0, -1.0]
    point = OodCalibration(score="energy", low=-5.0, high=-5.0, coverage=95.0, n_images=1)
    assert [point.relative(s) for s in (-5.0, -4.0, -6.0)] == [0.0, float("inf"), float("-inf")]
