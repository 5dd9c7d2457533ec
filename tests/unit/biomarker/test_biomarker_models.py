"""What the trained models learned: the documented drivers rank first; held-out metrics meet stated floors."""

from __future__ import annotations

import numpy as np
import pytest
from biomarker_inputs import SPEC_EXAMPLE
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from pipelines.shaping import class_probabilities
from core.cards import DEMO_INTENDED_USE
from core.schemas import BiomarkerResult
from preprocessing.tabular import encode_records, encode_request, stack_rows
from training_export.synthetic_biomarker import DRIVERS
from training_export.train_glioma import DATA_SHA256, GENES, INTENDED_USE, read_cohort
from xai.shap_plots import shap_explanation

SYNTHETIC_FLOORS = {"tumor_type_accuracy": 0.82, "metastasis_organ_accuracy": 0.74, "stage_accuracy": 0.93,
                    "tumor_type_auc": 0.95, "metastasis_organ_auc": 0.85, "stage_auc": 0.98}
"""Below what the demo model reaches (0.876 / 0.79 / 0.96; AUC 0.98 / 0.89 / 0.998) by a safe margin."""
GLIOMA_ACCURACY_FLOOR, GLIOMA_AUC_FLOOR = 0.85, 0.90
"""The literature reports LGG-vs-GBM accuracy of about 0.87-0.90 on this cohort; ours: 0.863 held out, 0.867 in 5-fold CV."""


def mean_abs_shap(card, explained: np.ndarray, head: str, cls: str) -> dict[str, float]:
    """Mean |SHAP| of each feature in the margin of `cls` of `head`, over explained rows."""
    classes = [(spec.name, c) for spec in card.heads for c in spec.classes]
    values = np.abs(explained[:, classes.index((head, cls)), :-2]).mean(axis=0)
    return dict(zip(card.feature_names(), values))


@pytest.mark.parametrize("head, cls", [(head, cls) for head, classes in DRIVERS.items() for cls in classes])
def test_documented_drivers_rank_first(trained, heldout_explained, head, cls):
    drivers = DRIVERS[head][cls]
    importance = mean_abs_shap(trained.biomarker_card, heldout_explained, head, cls)
    ranked = sorted(importance, key=importance.get, reverse=True)
    assert set(ranked[:len(drivers)]) == set(drivers), ranked[:5]


def test_spec_example_is_explained_by_its_marker(trained):
    row = encode_request(SPEC_EXAMPLE, trained.biomarker_card).row[None]
    heads = trained.biomarker_card.read_heads(trained.biomarker.explain(row)[0])
    tumour = heads["tumor_type"]
    assert tumour.classes[tumour.top] == "Prostate"
    names = trained.biomarker_card.feature_names()
    assert names[int(np.argmax(np.abs(tumour.shap_values[tumour.top])))] == "tumor_markers.PSA"


def measured(model, rows: np.ndarray, labels: dict[str, list[str]]) -> dict[str, float]:
    """Accuracy and one-vs-rest macro ROC AUC of each head, measured here on `rows` through the served `predict`."""
    probabilities, start, out = model.predict(rows), 0, {}
    for head in model.card.heads:
        block = probabilities[:, start:start + len(head.classes)]
        start += len(head.classes)
        target = np.array([head.classes.index(label) for label in labels[head.name]])
        out[f"{head.name}_accuracy"] = float(np.mean(block.argmax(axis=1) == target))
        scores = block[:, 1] if len(head.classes) == 2 else block
        out[f"{head.name}_auc"] = float(roc_auc_score(target, scores, multi_class="ovr", labels=range(len(head.classes))))
    return out


def test_synthetic_model_meets_its_floors_on_patients_it_never_saw(trained, heldout, heldout_rows):
    card = trained.biomarker_card
    assert card.intended_use == DEMO_INTENDED_USE and card.provenance.synthetic_data
    assert [h.name for h in card.heads] == ["tumor_type", "metastasis_organ", "stage"]
    metrics = measured(trained.biomarker, heldout_rows, heldout.labels)  # 1500 fresh patients (seed 1234)
    for metric, floor in SYNTHETIC_FLOORS.items():
        assert metrics[metric] >= floor, (metric, metrics[metric])
        assert abs(metrics[metric] - card.metrics[metric]) < 0.04, (metric, metrics[metric], card.metrics[metric])


def test_glioma_model_meets_the_literature_floor_on_heldout_patients(trained):
    card = trained.glioma_card
    records, grades = read_cohort()
    rows, labels = stack_rows(encode_records(records, card)), np.array(grades)
    split_seed, fraction = card.training_params["split_seed"], card.training_params["heldout_fraction"]
    train, heldout = train_test_split(np.arange(len(rows)), test_size=fraction, stratify=labels, random_state=split_seed)
    metrics = measured(trained.glioma, rows[heldout], {"grade": list(labels[heldout])})  # the 20 % it never saw
    assert metrics["grade_accuracy"] >= GLIOMA_ACCURACY_FLOOR and metrics["grade_auc"] >= GLIOMA_AUC_FLOOR, metrics
    assert metrics["grade_accuracy"] == pytest.approx(card.metrics["grade_accuracy"], abs=1e-3)  # the card says so too
    assert not set(train) & set(heldout) and len(heldout) == round(fraction * len(rows))
    assert card.provenance.synthetic_data is False and card.intended_use == INTENDED_USE
    assert "CC BY 4.0" in card.provenance.licence and "UCI" in card.provenance.data_description
    assert card.output_classes() == {"grade": ["LGG", "GBM"]} and len(card.features) == 23


def test_glioma_grade_is_driven_by_idh1_and_age(trained):
    rows = stack_rows(encode_records(read_cohort()[0], trained.glioma_card))
    importance = mean_abs_shap(trained.glioma_card, trained.glioma.explain(rows), "grade", "GBM")
    assert sorted(importance, key=importance.get, reverse=True)[:2] == ["mutations.IDH1", "Age_at_diagnosis"]


def test_glioma_cohort_is_read_as_requests_and_checked(tmp_path):
    records, grades = read_cohort()
    assert len(records) == 839 and grades.count("LGG") == 487 and grades.count("GBM") == 352
    assert set(records[0]) == {"Gender", "Age_at_diagnosis", "Race", "mutations"} and len(records[0]["mutations"]) == 20
    altered = tmp_path / "cohort.csv"
    altered.write_text("Grade,Gender\n0,0\n")
    with pytest.raises(ValueError, match=DATA_SHA256):
        read_cohort(altered)


def test_the_glioma_model_answers_through_the_same_schema_driven_path(trained):
    """Another card, another schema and head: validation, encoding, result and SHAP shaping need no code change."""
    patient = {"Gender": "female", "Age_at_diagnosis": 71.0, "Race": "white",
               "mutations": {gene: gene in ("TP53", "PTEN", "EGFR") for gene in GENES}}
    record = encode_request(patient, trained.glioma_card)
    heads = trained.glioma_card.read_heads(trained.glioma.explain(record.row[None])[0])
    result = BiomarkerResult.from_heads({n: class_probabilities(h.probabilities, h.classes) for n, h in heads.items()})
    assert result.tumor_type is None and result.metastasis is None and result.heads["grade"].predicted_class == "GBM"
    explanation = shap_explanation(heads, record.values, trained.glioma_card.feature_names())
    assert explanation.head == "grade" and explanation.feature_importance[0].feature in {"mutations.IDH1", "Age_at_diagnosis"}
