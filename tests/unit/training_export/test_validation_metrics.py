"""Calibration error of an import's validation folder, on outputs whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from core.cards import ClassificationCard
from training_export.import_classifier import (
    expected_calibration_error,
    validation_metrics,
)


def test_ece_is_the_weighted_gap_between_confidence_and_accuracy() -> None:
    probabilities = np.array([[0.9, 0.1]] * 10 + [[0.4, 0.6]] * 10)
    truth = np.array([0] * 9 + [1] + [1] * 3 + [0] * 7)  # 90 % right at 0.9, 30 % right at 0.6
    assert expected_calibration_error(probabilities, truth) == pytest.approx((0 * 10 + 0.3 * 10) / 20)
    assert expected_calibration_error(np.eye(2)[[0, 1, 1]], np.array([0, 1, 1])) == 0.0


def test_logits_are_turned_into_probabilities_before_measuring() -> None:
    card = ClassificationCard.model_validate({
        "name": "m", "intended_use": "x", "provenance": {"source": "s", "synthetic_data": True},
        "labels": ["tumour", "normal"], "label_map": {"tumour": "Glioma", "normal": "No Tumor"}, "output_kind": "logits",
    })
    logits = np.array([[np.log(9.0), 0.0]] * 4)  # softmax: 0.9 for "tumour"
    metrics = validation_metrics(card, logits, np.array([0, 0, 0, 1]))
    assert metrics["validation_ece"] == pytest.approx(0.15)
    assert metrics["validation_accuracy"] == 0.75 and metrics["validation_confusion_no_tumor_as_glioma"] == 1
