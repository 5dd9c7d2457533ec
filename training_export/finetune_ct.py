"""Fine-tune a stored CT classifier on doctors' reviewed feedback; register the result only if it is not worse.

The fine-tuning set is what `/feedback` stored: the exact prepared input tensors the model saw (so there is no
train/serve skew) with the reviewer's label (accepted prediction or correction). A deterministic part of it is held
out. The candidate and its parent are compared on that held-out feedback and on a reference set (for our demo model,
its synthetic held-out set); the candidate is stored as a new version of the same model only if it is at least as
accurate on both. Registering does not switch serving: an admin does that with `/update_model`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import torch
from pydantic import BaseModel, Field

from core import store
from core.cards import ClassificationCard, Lineage
from core.networks import load_module
from training_export.onnx_export import export_and_store
from training_export.train_ct import (
    augmentation,
    classification_metrics,
    confusion_matrix,
    heldout_set,
    predict_logits,
    prepare_ct_batch,
    torch_threads,
)

log = logging.getLogger(__name__)

Example = tuple[np.ndarray, str]
"""A prepared input tensor and its reviewed contract label."""


@dataclass(frozen=True)
class FineTuneConfig:
    """Fine-tuning settings: small steps from the parent, BatchNorm statistics kept frozen."""

    epochs: int = 5
    batch_size: int = 8
    learning_rate: float = 1e-4
    min_records: int = 8
    holdout_fraction: float = 0.25
    margin: float = 0.01
    """Non-inferiority margin: the accuracy the candidate may lose on an evaluation set and still count as not worse
    (one image in a hundred: a fine-tuning step moves a borderline case or two either way)."""
    seed: int = 0
    threads: int = 2


@dataclass(frozen=True)
class LabelledSet:
    """Prepared inputs (N, C, H, W) with output-index labels."""

    images: np.ndarray
    labels: np.ndarray


class FineTuneReport(BaseModel):
    """What a fine-tuning run did and why: registered with its tag, or refused with reasons."""

    registered: bool
    tag: str | None = None
    parent_tag: str
    reasons: list[str] = Field(default_factory=list)
    margin: float = Field(description="non-inferiority margin on accuracy")
    n_train: int = 0
    n_holdout: int = 0
    evaluation: dict[str, dict[str, float]] = Field(default_factory=dict)


def split_feedback(examples: Sequence[Example], holdout_fraction: float) -> tuple[list[Example], list[Example]]:
    """(train, held out): each distinct input goes to one side by its content hash, its latest label kept."""
    latest = {hashlib.sha256(np.ascontiguousarray(tensor).tobytes()).hexdigest(): (tensor, label)
              for tensor, label in examples}
    train, holdout = [], []
    for digest, example in sorted(latest.items()):
        (holdout if int(digest[:8], 16) / 0xFFFFFFFF < holdout_fraction else train).append(example)
    return train, holdout


def as_labelled_set(examples: Sequence[Example], card: ClassificationCard) -> LabelledSet:
    """Stack examples, labels turned into the model's output indices."""
    index = {label: i for i, label in enumerate(card.contract_labels())}
    images = np.stack([tensor for tensor, _ in examples]).astype(np.float32)
    return LabelledSet(images=images, labels=np.array([index[label] for _, label in examples], dtype=np.int64))


def usable_examples(examples: Sequence[Example], card: ClassificationCard, input_shape: tuple[int, ...]) -> list[Example]:
    """Examples whose tensor fits the model input and whose label is one of its classes."""
    classes = set(card.contract_labels())
    return [(tensor, label) for tensor, label in examples if tensor.shape == input_shape and label in classes]


def demo_reference_set(card: ClassificationCard) -> LabelledSet | None:
    """The synthetic held-out set a NeuroNova demo model was evaluated on, or None for any other model."""
    if not (card.provenance.synthetic_data and card.provenance.source == "NeuroNova training_export"):
        return None
    seed, per_class = int(card.metrics.get("seed", 0)), int(card.metrics["n_test"]) // len(card.labels)
    hu, _, labels = heldout_set(seed, per_class)
    return LabelledSet(images=prepare_ct_batch(hu, card.input), labels=labels)


def evaluate(module: torch.nn.Module, data: LabelledSet, n_classes: int, class_names: Sequence[str]) -> dict[str, float]:
    """accuracy, macro F1 and per-class recall of an eval-mode module on `data`, with the set's size."""
    predicted = predict_logits(module, data.images).argmax(axis=1)
    metrics = classification_metrics(confusion_matrix(data.labels, predicted, n_classes), class_names)
    return {**metrics, "n": float(len(data.labels))}


def fine_tune(module: torch.nn.Module, data: LabelledSet, config: FineTuneConfig) -> torch.nn.Module:
    """A few low-rate AdamW epochs on `data` with the training augmentation; BatchNorm statistics stay frozen."""
    torch.manual_seed(config.seed)
    augment = augmentation(config.seed)
    order_rng = np.random.default_rng(config.seed)
    optimiser = torch.optim.AdamW(module.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    module.train()
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            layer.eval()
    for _ in range(config.epochs):
        order = order_rng.permutation(len(data.labels))
        for start in range(0, len(order), config.batch_size):
            batch_index = order[start : start + config.batch_size]
            batch = torch.stack([augment({"image": data.images[i]})["image"] for i in batch_index])
            loss = torch.nn.functional.cross_entropy(module(batch), torch.from_numpy(data.labels[batch_index]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return module.eval()


def not_worse(evaluation: dict[str, dict[str, float]], sets: Sequence[str], margin: float) -> list[str]:
    """Reasons the candidate is worse than its parent on any evaluation set (empty: not worse)."""
    reasons = []
    for name in sets:
        parent, candidate = evaluation[f"{name}/parent"]["accuracy"], evaluation[f"{name}/candidate"]["accuracy"]
        if candidate < parent - margin:
            reasons.append(f"accuracy on {name} fell from {parent:.4f} to {candidate:.4f} (margin {margin})")
    return reasons


def finetune_from_feedback(
    examples: Sequence[Example],
    parent_tag: str,
    *,
    config: FineTuneConfig | None = None,
    reference: LabelledSet | None = None,
) -> FineTuneReport:
    """Fine-tune `parent_tag` on reviewed examples; store the candidate as a new version if it is not worse."""
    config = config or FineTuneConfig()
    parent = store.get_model(parent_tag)
    card = store.read_card(parent, ClassificationCard)
    report = FineTuneReport(registered=False, parent_tag=str(parent.tag), margin=config.margin)
    if card.torch is None:
        report.reasons.append("the model has no torch weights to fine-tune (an imported ONNX graph)")
        return report
    input_shape = (card.input.channels, card.input.height, card.input.width)
    usable = usable_examples(examples, card, input_shape)
    train, holdout = split_feedback(usable, config.holdout_fraction)
    report.n_train, report.n_holdout = len(train), len(holdout)
    if len(train) < config.min_records or not holdout:
        report.reasons.append(
            f"{len(usable)} usable reviewed inputs ({len(train)} to train, {len(holdout)} held out); "
            f"need at least {config.min_records} to train and one held out"
        )
        return report
    reference = reference if reference is not None else demo_reference_set(card)
    sets = {"feedback_holdout": as_labelled_set(holdout, card)} | ({"reference": reference} if reference else {})
    weights = parent.path_of(card.torch.weights_file)
    with torch_threads(config.threads):
        parent_module = load_module(card.torch, weights)
        candidate = fine_tune(load_module(card.torch, weights), as_labelled_set(train, card), config)
        for name, data in sets.items():
            for role, module in (("parent", parent_module), ("candidate", candidate)):
                report.evaluation[f"{name}/{role}"] = evaluate(module, data, len(card.labels), card.contract_labels())
    report.reasons = not_worse(report.evaluation, list(sets), config.margin)
    if report.reasons:
        log.info("candidate refused: %s", "; ".join(report.reasons))
        return report
    report.tag = register(candidate, card, report, next(iter(sets.values())).images)
    report.registered = True
    return report


def register(module: torch.nn.Module, parent_card: ClassificationCard, report: FineTuneReport, sample: np.ndarray) -> str:
    """Export the candidate (ONNX parity-checked), store it as a new version of the parent's name; return the tag."""
    name = report.parent_tag.split(":")[0]
    headline = "reference/candidate" if "reference/candidate" in report.evaluation else "feedback_holdout/candidate"
    metrics = {key: value for key, value in report.evaluation[headline].items() if key != "n"}
    provenance = parent_card.provenance.model_copy(update={
        "training_date": datetime.now(UTC).date().isoformat(),
        "data_description": f"{parent_card.provenance.data_description} Fine-tuned on {report.n_train} reviewed "
                            f"feedback inputs ({report.n_holdout} held out).",
    })
    lineage = Lineage(parent_tag=report.parent_tag, method="fine-tuned on reviewed feedback",
                      feedback_records=report.n_train + report.n_holdout, evaluation=report.evaluation,
                      non_inferiority_margin=report.margin)
    return export_and_store(
        name, module, sample[:16],
        lambda difference: parent_card.model_copy(update={
            "metrics": {**metrics, "onnx_max_abs_diff": difference}, "provenance": provenance, "lineage": lineage,
        }),
        labels={"parent": report.parent_tag.split(":")[1]},
    )
