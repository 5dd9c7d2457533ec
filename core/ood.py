"""Out-of-distribution warning: a cheap score on a classifier's raw outputs, calibrated on in-distribution images.

Logits are scored by their energy, −logsumexp(z) (Liu et al. 2020); probabilities (softmax inside the graph, so the
logits are gone) by 1 − max p; higher means less confident. Foreign inputs fail in both directions: noise makes a
model unsure, while a chest CT or a photo drives a small network's logits far beyond anything its training images
produced (measured: energies of −25 to −70 against −12 to −1 for in-distribution slices; docs/performance.md). So
the calibration is a typicality interval: the central `coverage` % of the scores of labelled in-distribution images
(the validation folder at import, the held-out set at training), and a score outside it is flagged; about
(100 − coverage) % of in-distribution inputs are flagged too.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

OOD_WARNING = "input unlike the model's training data"
DEFAULT_COVERAGE = 95.0
OutputKind = Literal["probabilities", "logits"]
ScoreKind = Literal["energy", "max_softmax", "mean_logit"]


class OodCalibration(BaseModel):
    """The range of OOD scores that looks like a model's in-distribution images."""

    model_config = ConfigDict(extra="forbid")

    score: ScoreKind
    low: float = Field(description="scores below this are flagged (over-confident beyond the training images)")
    high: float = Field(description="scores above this are flagged (less confident than the training images)")
    coverage: float = Field(gt=0, lt=100, description="percent of in-distribution scores inside [low, high]")
    n_images: int = Field(gt=0, description="in-distribution images the interval was computed on")

    def flags(self, score: float) -> bool:
        """Whether a score falls outside the in-distribution interval."""
        return not self.low <= score <= self.high

    def relative(self, score: float) -> float:
        """Where a score falls relative to the interval: 0 at `low`, 1 at `high` (monitoring's common scale)."""
        span = self.high - self.low
        if span <= 0:
            return 0.0 if score == self.low else math.copysign(math.inf, score - self.low)
        return (score - self.low) / span


def score_kind(output_kind: OutputKind) -> ScoreKind:
    """Energy for logits; 1 − max softmax for probabilities."""
    return "energy" if output_kind == "logits" else "max_softmax"


def ood_scores(outputs: np.ndarray, output_kind: OutputKind, score: ScoreKind | None = None) -> np.ndarray:
    """(N, K) raw model outputs -> (N,) float32 scores, higher = less like the training data.

    `score` defaults to the output kind's (score_kind); "mean_logit" (−mean of the logits: the model's overall
    activation) suits models whose logits are all pushed negative away from the evidence, as our lesion-supervised
    demo model's are (docs/performance.md).
    """
    from scipy.special import logsumexp  # here, not at import: the API workers read calibrations only

    kind = score or score_kind(output_kind)
    if kind != "max_softmax" and output_kind != "logits":
        raise ValueError(f"the {kind} score needs a model that outputs logits")
    values = np.asarray(outputs, dtype=np.float64)
    if kind == "energy":
        return (-logsumexp(values, axis=1)).astype(np.float32)
    if kind == "mean_logit":
        return (-values.mean(axis=1)).astype(np.float32)
    probabilities = np.exp(values - logsumexp(values, axis=1, keepdims=True)) if output_kind == "logits" else values
    return (1.0 - probabilities.max(axis=1)).astype(np.float32)


def calibrate_ood(
    outputs: np.ndarray, output_kind: OutputKind, coverage: float = DEFAULT_COVERAGE, score: ScoreKind | None = None
) -> OodCalibration:
    """The interval holding the central `coverage` % of the `score`s of in-distribution raw outputs (N, K)."""
    scores = ood_scores(outputs, output_kind, score)
    if len(scores) == 0:
        raise ValueError("OOD calibration needs at least one in-distribution image")
    tail = (100.0 - coverage) / 2.0
    low, high = np.percentile(scores, [tail, 100.0 - tail])
    return OodCalibration(score=score or score_kind(output_kind), low=float(low), high=float(high), coverage=coverage,
                          n_images=len(scores))


def ood_warnings(score: float, calibration: OodCalibration | None) -> list[str]:
    """The warning for a response whose input scored outside the model's calibrated interval (none uncalibrated)."""
    return [OOD_WARNING] if calibration is not None and calibration.flags(score) else []
