"""The drift score: the binomial tail of the recent OOD flags against the card's expected rate."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from monitoring.drift import DEFAULT_WINDOW, MIN_CHECKS, FlagWindow, drift_score

ALERT = 4.0
"""The shipped alert's threshold (deploy/monitoring/alerts.yml, NeuroNovaInputDrift)."""


@pytest.mark.parametrize(("flagged", "checks", "rate"), [(1, 50, 0.05), (5, 50, 0.05), (12, 50, 0.025), (3, 20, 0.1)])
def test_the_score_is_the_binomial_tail(flagged: int, checks: int, rate: float) -> None:
    assert drift_score(flagged, checks, rate) == pytest.approx(-np.log10(binom.sf(flagged - 1, checks, rate)), rel=1e-9)


def test_no_flags_is_no_evidence_and_all_flags_stay_finite() -> None:
    assert drift_score(0, 50, 0.05) == 0.0
    assert drift_score(1000, 1000, 0.001) == pytest.approx(3000.0)


@pytest.mark.parametrize(("flagged", "checks", "rate"), [(1, 50, 0.0), (1, 50, 1.0), (51, 50, 0.05), (-1, 50, 0.05)])
def test_impossible_arguments_are_refused(flagged: int, checks: int, rate: float) -> None:
    with pytest.raises(ValueError):
        drift_score(flagged, checks, rate)


def test_the_window_scores_only_its_last_checks() -> None:
    window = FlagWindow(0.05, size=DEFAULT_WINDOW)
    scores = [window.add(True) for _ in range(MIN_CHECKS - 1)]
    assert scores == [0.0] * (MIN_CHECKS - 1)  # too few checks to say anything
    assert window.add(True) == pytest.approx(drift_score(MIN_CHECKS, MIN_CHECKS, 0.05))
    for _ in range(DEFAULT_WINDOW):
        window.add(False)
    assert window.score() == 0.0  # the flagged checks have left the window


def test_a_window_larger_than_its_minimum_is_required() -> None:
    with pytest.raises(ValueError):
        FlagWindow(0.05, size=10, min_checks=20)


def test_in_distribution_streams_rarely_alert_and_a_shifted_one_soon_does() -> None:
    """In-distribution inputs are flagged at the card's rate; a shifted stream at 80 %. Seeded, so exact."""
    rng = np.random.default_rng(0)
    false_alarms = 0
    for _ in range(200):
        window = FlagWindow(0.05)
        false_alarms += max(window.add(bool(f)) for f in rng.random(200) < 0.05) > ALERT
    assert false_alarms <= 2  # of 200 streams of 200 inputs
    window = FlagWindow(0.05)
    for flag in rng.random(100) < 0.05:
        window.add(bool(flag))
    delay = next(n for n, flag in enumerate(rng.random(100) < 0.8, start=1) if window.add(bool(flag)) > ALERT)
    assert delay <= 20
