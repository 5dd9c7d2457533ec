"""Train a glioma grade model (LGG vs GBM) on the real TCGA clinical + mutation cohort and store it with its card.

Data: "Glioma Grading Clinical and Mutation Features" (UCI Machine Learning Repository, dataset 759; Tasci, Zhang,
Sert et al., 2022), built from TCGA-LGG and TCGA-GBM; CC BY 4.0. 839 patients: Grade (0 LGG, 1 GBM), Gender
(0 male, 1 female), Age_at_diagnosis, Race (0 white, 1 black or African American, 2 Asian, 3 American Indian or
Alaska Native) and 20 mutation flags. Each CSV row becomes the nested record a request would send and goes through
preprocessing.tabular like one. Held-out metrics come from a stratified 20 % split the stored model never saw.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import asdict
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from core.cards import Provenance
from core.cards.tabular import (
    BoolFeature,
    CategoryFeature,
    FeatureSpec,
    HeadSpec,
    NumberFeature,
    TabularCard,
    sex_codes,
)
from preprocessing.tabular import encode_records, stack_rows
from training_export.train_biomarker import TreeParams, fit_heads, heldout_metrics, save_tabular_model

log = logging.getLogger(__name__)

MODEL_NAME = "neuronova-glioma-grade"
DATA_PATH = Path(__file__).resolve().parents[1] / "data" / "glioma_grading" / "TCGA_InfoWithGrade.csv"
"""The cohort shipped with the repository (source, licence and checksum in data/glioma_grading/README.md)."""
DATA_SHA256 = "bc2676f7244e944df6acf2f6bab3692427012cf9345e6fd5b4df5caa6dd26132"
INTENDED_USE = "research demo, not for clinical use"
CITATION = ("Tasci E., Zhang Y., Sert M. et al., Glioma Grading Clinical and Mutation Features, "
            "UCI Machine Learning Repository (2022), https://doi.org/10.24432/C5R62J")
GRADES: tuple[str, ...] = ("LGG", "GBM")
GENDERS: tuple[str, ...] = ("male", "female")
RACES: tuple[str, ...] = ("white", "black or african american", "asian", "american indian or alaska native")
GENES: tuple[str, ...] = ("IDH1", "TP53", "ATRX", "PTEN", "EGFR", "CIC", "MUC16", "PIK3CA", "NF1", "PIK3R1", "FUBP1",
                          "RB1", "NOTCH1", "BCOR", "CSMD3", "SMARCA4", "GRIN2A", "IDH2", "FAT4", "PDGFRA")
PARAMS = TreeParams(max_depth=2, eta=0.1, rounds=100, subsample=0.8, min_child_weight=1.0)
HELDOUT_FRACTION = 0.2

GLIOMA_FEATURES: tuple[FeatureSpec, ...] = (
    CategoryFeature(name="Gender", group="clinical", categories=list(GENDERS), codes=sex_codes(list(GENDERS))),
    NumberFeature(name="Age_at_diagnosis", group="clinical", unit="years", min=0, max=120),
    CategoryFeature(name="Race", group="clinical", categories=list(RACES)),
    *(BoolFeature(name=f"mutations.{gene}", group="mutations", description=f"{gene} mutated") for gene in GENES),
)
GRADE_HEAD = HeadSpec(name="grade", classes=list(GRADES), model_file="grade.ubj",
                      description="LGG (WHO grade 2-3) or GBM (grade 4)")


def read_cohort(path: Path = DATA_PATH) -> tuple[list[dict[str, Any]], list[str]]:
    """The CSV as nested request records and grade labels; refuses a file whose sha256 is not the documented one."""
    content = path.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    if digest != DATA_SHA256:
        raise ValueError(f"{path} has sha256 {digest}, not the documented {DATA_SHA256} (see data/glioma_grading/README.md)")
    rows = list(csv.DictReader(content.decode("utf-8").splitlines()))
    records = [{
        "Gender": GENDERS[int(row["Gender"])],
        "Age_at_diagnosis": float(row["Age_at_diagnosis"]),
        "Race": RACES[int(row["Race"])],
        "mutations": {gene: row[gene] == "1" for gene in GENES},
    } for row in rows]
    return records, [GRADES[int(row["Grade"])] for row in rows]


def train_and_save(path: Path = DATA_PATH, seed: int = 0) -> str:
    """Train on 80 % of the cohort, measure on the held-out 20 % (and 5-fold CV), store; return the tag."""
    card = TabularCard(
        name="Glioma grade from clinical and mutation features (XGBoost)", features=list(GLIOMA_FEATURES),
        heads=[GRADE_HEAD], intended_use=INTENDED_USE,
        provenance=Provenance(
            source="neuronova training_export.train_glioma", licence="CC BY 4.0 (data); model Apache-2.0",
            training_date=date.today().isoformat(), synthetic_data=False,
            data_description=f"TCGA-LGG/GBM, 839 patients (sha256 {DATA_SHA256[:12]}...); {CITATION}",
        ),
        training_params={**asdict(PARAMS), "heldout_fraction": HELDOUT_FRACTION, "split_seed": seed},
    )
    records, grades = read_cohort(path)
    rows = stack_rows(encode_records(records, card))
    labels = np.array(grades)
    train, heldout = train_test_split(np.arange(len(rows)), test_size=HELDOUT_FRACTION, stratify=labels, random_state=seed)
    boosters = fit_heads(rows[train], {"grade": labels[train]}, card.heads, PARAMS)
    card.metrics = {
        **heldout_metrics(boosters, rows[heldout], {"grade": labels[heldout]}, card.heads),
        "grade_cv5_accuracy": _cross_validated_accuracy(rows, labels, card, seed),
    }
    tag = save_tabular_model(MODEL_NAME, card, boosters)
    log.info("stored %s: %s", tag, card.metrics)
    return tag


def _cross_validated_accuracy(rows: np.ndarray, labels: np.ndarray, card: TabularCard, seed: int) -> float:
    """Mean accuracy over 5 stratified folds of the whole cohort (a steadier estimate than one split)."""
    scores = []
    for fit, held in StratifiedKFold(n_splits=5, shuffle=True, random_state=seed).split(rows, labels):
        boosters = fit_heads(rows[fit], {"grade": labels[fit]}, card.heads, PARAMS)
        scores.append(heldout_metrics(boosters, rows[held], {"grade": labels[held]}, card.heads)["grade_accuracy"])
    return round(float(np.mean(scores)), 4)
