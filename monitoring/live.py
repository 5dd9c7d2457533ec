"""The live figures `/model_info` shows beside each card's held-out metrics: this replica's per-version metrics
(summed over its API workers, as `/metrics` shows them) and the clinicians' verdicts from the feedback store."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from bentoml._internal.configuration.containers import BentoMLContainer
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from state.feedback import FeedbackStore
from core.schemas import LiveFigures
from monitoring.metrics import NAMESPACE


def replica_samples() -> list[Sample]:
    """Every sample of this replica's `neuronova_*` metrics, all API workers together."""
    client = BentoMLContainer.metrics_client.get()
    try:
        text = client.generate_latest()
    except ValueError:  # in-process (development mode, tests): no multiprocess directory, one process's registry
        text = client.prometheus_client.generate_latest(client.registry)
    return [sample for family in text_string_to_metric_families(text.decode())
            if family.name.startswith(f"{NAMESPACE}_") for sample in family.samples]


def live_figures(model_id: str, model_version: str, feedback: FeedbackStore, samples: Iterable[Sample]) -> LiveFigures:
    """One served version's figures from this replica's `samples` (`replica_samples`: answers, OOD checks, drift) and
    the verdicts of every replica (the feedback store)."""
    own = [s for s in samples if s.labels.get("model_id") == model_id and s.labels.get("model_version") == model_version]

    def values(name: str) -> list[Sample]:
        return [s for s in own if s.name == f"{NAMESPACE}_{name}"]

    def single(name: str) -> float | None:
        found = values(name)
        return max(s.value for s in found) if found else None

    predictions: dict[str, dict[str, int]] = defaultdict(dict)
    for sample in values("predictions_total"):
        predictions[sample.labels["output"]][sample.labels["predicted_class"]] = int(sample.value)
    checks = {s.labels["flagged"]: int(s.value) for s in values("ood_checks_total")}
    total, flagged = sum(checks.values()), checks.get("true", 0)
    verdicts = feedback.verdict_counts(model_id, model_version)
    given = sum(verdicts.values())
    return LiveFigures(
        predictions=dict(predictions), ood_checks=total, ood_flagged=flagged, ood_rate=flagged / total if total else None,
        expected_ood_rate=single("expected_ood_rate"), drift_score=single("input_drift_score"),
        verdicts=verdicts, agreement_rate=verdicts.get("accept", 0) / given if given else None,
        reference_accuracy=single("model_reference_accuracy"),
    )
