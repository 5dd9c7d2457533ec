"""The synthetic cohort is deterministic, follows its documented rules and validates against the SPEC schema."""

from __future__ import annotations

import numpy as np

from core.cards import DEMO_INTENDED_USE, Provenance
from core.cards.tabular import TabularCard
from preprocessing.tabular import encode_records
from training_export.synthetic_biomarker import MISSING_RATE, SPEC_FEATURES, STAGE_LIMITS_MM, generate_cohort
from training_export.train_biomarker import DEMO_HEADS


def test_same_seed_same_cohort_other_seed_other_cohort():
    assert generate_cohort(50, seed=3) == generate_cohort(50, seed=3)
    assert generate_cohort(50, seed=3).records != generate_cohort(50, seed=4).records


def test_cohort_follows_its_rules():
    cohort = generate_cohort(3000, seed=11)
    types, organs, stages = (cohort.labels[h] for h in ("tumor_type", "metastasis_organ", "stage"))
    for record, kind, organ, stage in zip(cohort.records, types, organs, stages):
        size = record["imaging_features"]["tumor_size_mm"]
        if kind == "Prostate":
            assert record["gender"] == "male"
        if kind == "Ovarian":
            assert record["gender"] == "female"
        if record["imaging_features"]["tumor_shape"] == "none":
            assert size == 0 and stage == "None" and organ == "None"
        elif stage == "T1":
            assert size <= STAGE_LIMITS_MM[0] + 8  # measured size: true size + N(0, 1.5) mm
        if organ == "Brain":
            assert kind == "Lung"
    optional = [v for r in cohort.records for g in ("tumor_markers", "blood_test", "genetic_markers") for v in r[g].values()]
    assert abs(np.mean([v is None for v in optional]) - MISSING_RATE) < 0.01
    psa = {kind: np.nanmedian([r["tumor_markers"]["PSA"] or np.nan for r, k in zip(cohort.records, types) if k == kind])
           for kind in ("Prostate", "Lung")}
    assert psa["Prostate"] > 10 * psa["Lung"]


def test_every_record_is_a_valid_request():
    card = TabularCard(name="spec", intended_use=DEMO_INTENDED_USE, provenance=Provenance(source="t", synthetic_data=True),
                       features=list(SPEC_FEATURES), heads=list(DEMO_HEADS))
    cohort = generate_cohort(500, seed=5)
    assert len(encode_records(cohort.records, card)) == 500
    assert all(set(labels) <= set(card.output_classes()[head]) for head, labels in cohort.labels.items())
