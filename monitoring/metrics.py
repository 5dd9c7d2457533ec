"""What the models see and how clinicians judge them, per model and version, on the service's own `/metrics`
(BentoML's Prometheus client, multiprocess: every API worker writes, one scrape reads them all).

Every label value is bounded: model ids are the service's three, versions are the store's, classes, heads, features
and modalities come from the served model's card (anything else counts as "other"); no patient or request id.
Names, labels and meaning are listed in docs/api.md ("Monitoring metrics").
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bentoml._internal.configuration.containers import BentoMLContainer

from monitoring.drift import FlagWindow

NAMESPACE = "neuronova"
VERSION_LABELS = ["model_id", "model_version"]
OTHER = "other"
UNSTATED = "unstated"
RELATIVE_OOD_BUCKETS = (-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0, math.inf)
IMAGE_SIDE_BUCKETS = (64, 128, 256, 384, 512, 768, 1024, 2048, 4096, math.inf)
SPACING_MM_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, math.inf)
UNCERTAINTY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, math.inf)
REFERENCE_ACCURACY_KEYS = ("accuracy",)
"""Card metrics that say how often the model was right on its held-out set; a tabular card's first head's
`<head>_accuracy` too (`reference_accuracy`)."""


@dataclass(frozen=True)
class Families:
    predictions: Any
    ood_checks: Any
    ood_relative: Any
    drift: Any
    expected_ood_rate: Any
    reference_accuracy: Any
    served: Any
    inputs: Any
    image_side: Any
    spacing: Any
    missing_features: Any
    mri_confidence: Any
    mri_uncertainty: Any
    verdicts: Any
    corrections: Any


@functools.cache
def families() -> Families:
    """The metric families, made once per process on first use (the worker's multiprocess directory is set by then)."""
    client = BentoMLContainer.metrics_client.get()

    def counter(name: str, documentation: str, labels: Sequence[str] = ()) -> Any:
        return client.Counter(namespace=NAMESPACE, name=name, documentation=documentation,
                              labelnames=[*VERSION_LABELS, *labels])

    def histogram(name: str, documentation: str, buckets: Sequence[float]) -> Any:
        return client.Histogram(namespace=NAMESPACE, name=name, documentation=documentation,
                                labelnames=VERSION_LABELS, buckets=buckets)

    def gauge(name: str, documentation: str, mode: str, labels: Sequence[str] = ()) -> Any:
        return client.Gauge(namespace=NAMESPACE, name=name, documentation=documentation,
                            labelnames=[*VERSION_LABELS, *labels], multiprocess_mode=mode)

    return Families(
        predictions=counter("predictions", "Answers by output (head) and predicted class", ["output", "predicted_class"]),
        ood_checks=counter("ood_checks", "Out-of-distribution checks of inputs, by outcome", ["flagged"]),
        ood_relative=histogram("ood_score_relative", "OOD score relative to the card's in-distribution bound: "
                               "0..1 inside it (CT: low..high; MRI: distance / threshold)", RELATIVE_OOD_BUCKETS),
        drift=gauge("input_drift_score", "-log10 binomial tail of the OOD flags in a worker's window of recent checks "
                    "against the card's expected rate (the worker that checked last)", "livemostrecent", ["signal"]),
        expected_ood_rate=gauge("expected_ood_rate", "Share of in-distribution inputs the card's OOD calibration flags",
                                "max"),
        reference_accuracy=gauge("model_reference_accuracy", "Held-out accuracy from the model's card", "max"),
        served=gauge("model_served", "1 for the version a model answers with now, 0 for one it answered with before "
                     "(the worker that answered last)", "livemostrecent"),
        inputs=counter("inputs", "Inputs by format and modality", ["format", "modality"]),
        image_side=histogram("input_image_side_pixels", "Longer side of each input image or volume slice",
                             IMAGE_SIDE_BUCKETS),
        spacing=histogram("input_spacing_mm", "Finest in-plane pixel spacing of each input that states one",
                          SPACING_MM_BUCKETS),
        missing_features=counter("missing_features", "Tabular features a request did not give", ["feature"]),
        mri_confidence=counter("mri_confidence", "Segmentations by confidence level", ["level"]),
        mri_uncertainty=histogram("mri_uncertainty_mean", "Mean uncertainty (0-1) over the delivered tumour voxels",
                                  UNCERTAINTY_BUCKETS),
        verdicts=counter("feedback_verdicts", "Clinicians' verdicts on results", ["verdict"]),
        corrections=counter("feedback_corrections", "Clinicians' corrections: the model's class and the reviewer's",
                            ["predicted_class", "corrected_class"]),
    )


def bounded(value: str | None, allowed: Sequence[str]) -> str:
    """`value` where it is one of `allowed`, else "other" (a label never takes a caller's free text)."""
    return value if value is not None and value in allowed else OTHER


def reference_accuracy(metrics: dict[str, float], first_head: str | None = None) -> float | None:
    """The card's held-out accuracy: `accuracy`, or for a tabular card its first head's `<head>_accuracy`."""
    keys = [*REFERENCE_ACCURACY_KEYS, *([f"{first_head}_accuracy"] if first_head else [])]
    return next((metrics[key] for key in keys if key in metrics), None)


@functools.lru_cache(maxsize=8192)
def series(family: str, *labels: str) -> Any:
    """One labelled series of a family, looked up once per process (label values are bounded, so is the cache):
    an answer then costs one mmap write per metric (docs/performance.md, "Monitoring")."""
    return getattr(families(), family).labels(*labels)


@functools.lru_cache(maxsize=1024)
def publish_reference(family: str, model_id: str, model_version: str, value: float) -> None:
    """A card's figure for a version (it never changes), set once per process."""
    series(family, model_id, model_version).set(value)


class DriftWindows:
    """Each model version's window of OOD flags in this worker, and the gauge that shows its score. The gauge is
    set on every check, even to the same value: the scrape shows the worker that checked last, never a worker's
    stale window (multiprocess mode `livemostrecent`)."""

    def __init__(self) -> None:
        self._windows: dict[tuple[str, str], FlagWindow] = {}
        self._lock = threading.Lock()  # MRI results are measured in threads

    def observe(self, model_id: str, model_version: str, expected_rate: float, flagged: bool) -> float:
        key = (model_id, model_version)
        with self._lock:
            window = self._windows.get(key)
            if window is None or window.expected_rate != expected_rate:
                window = self._windows[key] = FlagWindow(expected_rate)
            score = window.add(flagged)
        series("drift", model_id, model_version, "ood_rate").set(score)
        return score


DRIFT = DriftWindows()


class ServedVersions:
    """Which version of each model this worker answered with last: a switch (or a rollback) marks the version left
    behind 0, so that alerts on its frozen figures stop (the rules watch served versions only)."""

    def __init__(self) -> None:
        self._current: dict[str, str] = {}
        self._lock = threading.Lock()

    def observe(self, model_id: str, model_version: str) -> None:
        with self._lock:
            previous = self._current.get(model_id)
            if previous == model_version:
                return
            self._current[model_id] = model_version
        if previous is not None:
            series("served", model_id, previous).set(0)
        series("served", model_id, model_version).set(1)


SERVED = ServedVersions()


def observe_model(model_id: str, model_version: str, accuracy: float | None) -> None:
    """An answer of this version: it is the one served; its card's held-out accuracy beside the live figures."""
    SERVED.observe(model_id, model_version)
    if accuracy is not None:
        publish_reference("reference_accuracy", model_id, model_version, accuracy)


def observe_ood(model_id: str, model_version: str, relative_score: float, flagged: bool, coverage: float) -> None:
    """One OOD check: its outcome, where the score fell relative to the card's bound, and the drift window."""
    expected = 1.0 - coverage / 100.0
    series("ood_checks", model_id, model_version, "true" if flagged else "false").inc()
    if math.isfinite(relative_score):
        series("ood_relative", model_id, model_version).observe(relative_score)
    publish_reference("expected_ood_rate", model_id, model_version, expected)
    DRIFT.observe(model_id, model_version, expected, flagged)


def observe_prediction(model_id: str, model_version: str, output: str, predicted_class: str) -> None:
    series("predictions", model_id, model_version, output, predicted_class).inc()


def observe_image(model_id: str, model_version: str, image_format: str, modality: str | None,
                  modalities: Sequence[str], shape: Sequence[int], spacing_mm: Sequence[float] | None) -> None:
    """An input image's format, modality (one of the card's, "other", or "unstated" where the file names none), size
    and spacing."""
    label = UNSTATED if modality is None else bounded(modality, modalities)
    series("inputs", model_id, model_version, image_format, label).inc()
    series("image_side", model_id, model_version).observe(max(shape))
    if spacing_mm:
        series("spacing", model_id, model_version).observe(min(spacing_mm))


def observe_missing(model_id: str, model_version: str, missing: Sequence[str], features: Sequence[str]) -> None:
    for feature in missing:
        series("missing_features", model_id, model_version, bounded(feature, features)).inc()


def observe_segmentation(model_id: str, model_version: str, confidence: str, uncertainty_mean: float | None) -> None:
    series("mri_confidence", model_id, model_version, confidence).inc()
    if uncertainty_mean is not None:
        series("mri_uncertainty", model_id, model_version).observe(uncertainty_mean)


def observe_verdict(model_id: str, model_version: str, verdict: str, predicted: str | None, corrected: str | None,
                    labels: Sequence[str]) -> None:
    """A clinician's verdict; a corrected class also by (the model's class, the reviewer's), both from the card."""
    series("verdicts", model_id, model_version, verdict).inc()
    if corrected is not None:
        series("corrections", model_id, model_version, bounded(predicted, labels), bounded(corrected, labels)).inc()
