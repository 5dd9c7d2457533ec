"""Train the demo biomarker model (three XGBoost heads) on the synthetic cohort and store it with its card.

Records go through preprocessing.tabular.encode_records, exactly as the service encodes a request. The tree helpers
here (`fit_heads`, `heldout_metrics`, `save_tabular_model`) are shared with the real-data glioma trainer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import date

import numpy as np
import xgboost as xgb
from sklearn.metrics import accuracy_score, roc_auc_score

from core import store
from core.cards import DEMO_INTENDED_USE, Provenance
from core.cards.tabular import HeadSpec, TabularCard
from preprocessing.tabular import encode_records, stack_rows
from training_export.synthetic_biomarker import ORGANS, SPEC_FEATURES, STAGES, TUMOR_TYPES, generate_cohort

log = logging.getLogger(__name__)

MODEL_NAME = "neuronova-biomarker"
_TRAIN_STREAM, _HELDOUT_STREAM = 0, 1


@dataclass(frozen=True)
class TreeParams:
    """XGBoost settings of every head (small trees: fast exact TreeSHAP at serving time)."""

    max_depth: int = 3
    eta: float = 0.3
    rounds: int = 30
    subsample: float = 0.9
    min_child_weight: float = 2.0
    seed: int = 0
    threads: int = 1

    def booster_params(self, n_classes: int) -> dict[str, float | int | str]:
        return {
            "objective": "multi:softprob", "num_class": n_classes, "eval_metric": "mlogloss", "tree_method": "hist",
            "max_depth": self.max_depth, "eta": self.eta, "subsample": self.subsample,
            "min_child_weight": self.min_child_weight, "seed": self.seed, "nthread": self.threads,
        }


def fit_heads(
    rows: np.ndarray, labels: dict[str, Sequence[str]], heads: Sequence[HeadSpec], params: TreeParams
) -> list[xgb.Booster]:
    """One softmax tree ensemble per head, in head order."""
    boosters = []
    for head in heads:
        target = np.array([head.classes.index(label) for label in labels[head.name]])
        data = xgb.DMatrix(rows, label=target, nthread=params.threads)
        boosters.append(xgb.train(params.booster_params(len(head.classes)), data, num_boost_round=params.rounds))
    return boosters


def heldout_metrics(boosters: Sequence[xgb.Booster], rows: np.ndarray, labels: dict[str, Sequence[str]],
                    heads: Sequence[HeadSpec]) -> dict[str, float]:
    """Accuracy and (one-vs-rest macro) ROC AUC of each head on held-out rows."""
    metrics = {}
    data = xgb.DMatrix(rows, nthread=1)
    for booster, head in zip(boosters, heads):
        target = np.array([head.classes.index(label) for label in labels[head.name]])
        probabilities = booster.predict(data)
        metrics[f"{head.name}_accuracy"] = round(float(accuracy_score(target, probabilities.argmax(axis=1))), 4)
        scores = probabilities[:, 1] if len(head.classes) == 2 else probabilities
        auc = roc_auc_score(target, scores, multi_class="ovr", labels=range(len(head.classes)))
        metrics[f"{head.name}_auc"] = round(float(auc), 4)
    return metrics


def save_tabular_model(name: str, card: TabularCard, boosters: Sequence[xgb.Booster]) -> str:
    """Store each head's booster (UBJSON) under its card file name; return the tag."""
    files = {head.model_file: bytes(booster.save_raw("ubj")) for head, booster in zip(card.heads, boosters)}
    return store.save_model(name, card, files)


DEMO_HEADS = (
    HeadSpec(name="tumor_type", classes=list(TUMOR_TYPES), model_file="tumor_type.ubj", description="primary tumour type"),
    HeadSpec(name="metastasis_organ", classes=list(ORGANS), model_file="metastasis_organ.ubj",
             description="organ of a distant metastasis, None when there is none"),
    HeadSpec(name="stage", classes=list(STAGES), model_file="stage.ubj", description="T stage; None without a lesion"),
)


def train_and_save(n_train: int = 6000, n_heldout: int = 2000, seed: int = 0, params: TreeParams = TreeParams()) -> str:
    """Generate the cohort, train the three heads, measure them on an independent cohort, store; return the tag."""
    card = TabularCard(
        name="NeuroNova biomarker demo (XGBoost, 3 heads)", features=list(SPEC_FEATURES), heads=list(DEMO_HEADS),
        intended_use=DEMO_INTENDED_USE,
        provenance=Provenance(
            source="neuronova training_export.train_biomarker", licence="Apache-2.0",
            training_date=date.today().isoformat(), synthetic_data=True,
            data_description=f"{n_train} synthetic patients (training_export.synthetic_biomarker rules, seed {seed}); "
                             f"metrics on {n_heldout} independent synthetic patients",
        ),
        training_params={**asdict(params), "n_train": n_train, "n_heldout": n_heldout},
    )
    train = generate_cohort(n_train, seed=seed * 2 + _TRAIN_STREAM)
    heldout = generate_cohort(n_heldout, seed=seed * 2 + _HELDOUT_STREAM)
    boosters = fit_heads(stack_rows(encode_records(train.records, card)), train.labels, card.heads, params)
    card.metrics = heldout_metrics(boosters, stack_rows(encode_records(heldout.records, card)), heldout.labels, card.heads)
    tag = save_tabular_model(MODEL_NAME, card, boosters)
    log.info("stored %s: %s", tag, card.metrics)
    return tag
