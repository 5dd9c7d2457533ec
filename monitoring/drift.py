"""Input drift without labels: is the out-of-distribution flag rate of the recent inputs above what the model's card
expects?

Every served model's card stores its OOD calibration from in-distribution images (the held-out set at training, the
validation folder at import): an interval (CT) or a distance threshold (MRI) that holds `coverage` % of them, so an
in-distribution input is flagged with probability p0 = 1 − coverage / 100. Over a sliding window of the last n
checks with k flagged, the drift score is the evidence against "these inputs come from the training distribution":
−log10 of the one-sided binomial tail P(X ≥ k | n, p0). It is 0 while k is at or below what p0 predicts, 3 when so
many flags would happen once in a thousand windows, and it grows without bound as the stream shifts (a scanner,
protocol or modality the model never saw). One statistic serves every model with a calibration, needs no labels and
nothing from the card beyond what it already holds.

Why not a drift library: Evidently, NannyML and Alibi Detect compare whole feature distributions and would add tens
to hundreds of MB to every API worker (pandas / plotting stacks, or TensorFlow / torch back ends for Alibi Detect's
learned detectors) for what is here one score per input against a rate the card already states. Their strength,
distribution tests over many features, is what a per-feature reference in the card would need first.
"""

from __future__ import annotations

import functools
import math
from collections import deque

DEFAULT_WINDOW = 50
MIN_CHECKS = 20
"""Fewer checks than this give no score: a handful of flags early on is not evidence of drift."""


@functools.lru_cache(maxsize=4096)
def drift_score(flagged: int, checks: int, expected_rate: float) -> float:
    """−log10 P(X ≥ flagged) for X ~ Binomial(checks, expected_rate): how surprising `flagged` flags are in `checks`
    in-distribution inputs. Computed in log space, so that a window of nothing but foreign inputs is still finite."""
    if not 0 < expected_rate < 1:
        raise ValueError(f"expected_rate must be in (0, 1), got {expected_rate}")
    if not 0 <= flagged <= checks:
        raise ValueError(f"flagged ({flagged}) must be between 0 and checks ({checks})")
    if flagged == 0:
        return 0.0
    log_p, log_q = math.log(expected_rate), math.log1p(-expected_rate)
    terms = [math.lgamma(checks + 1) - math.lgamma(i + 1) - math.lgamma(checks - i + 1) + i * log_p + (checks - i) * log_q
             for i in range(flagged, checks + 1)]
    top = max(terms)
    log_tail = top + math.log(sum(math.exp(term - top) for term in terms))
    return max(0.0, -log_tail / math.log(10))


class FlagWindow:
    """The last `size` OOD checks of one model version, and the drift score of their flags."""

    def __init__(self, expected_rate: float, size: int = DEFAULT_WINDOW, min_checks: int = MIN_CHECKS) -> None:
        if min_checks > size:
            raise ValueError(f"min_checks ({min_checks}) exceeds the window ({size})")
        self.expected_rate = expected_rate
        self.min_checks = min_checks
        self._flags: deque[bool] = deque(maxlen=size)
        self._flagged = 0

    def add(self, flagged: bool) -> float:
        """Record one check; the window's drift score after it."""
        if len(self._flags) == self._flags.maxlen:
            self._flagged -= self._flags[0]
        self._flags.append(flagged)
        self._flagged += flagged
        return self.score()

    def score(self) -> float:
        """The drift score of the window (0 until it holds `min_checks` checks)."""
        if len(self._flags) < self.min_checks:
            return 0.0
        return drift_score(self._flagged, len(self._flags), self.expected_rate)
