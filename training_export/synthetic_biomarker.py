"""A deterministic synthetic cohort for SPEC.md's biomarker schema, with documented generating rules.

Nothing here is patient data; the rules are plausible in direction, not calibrated clinically. Per patient:

1. **Primary tumour type** (head `tumor_type`) ~ Lung .28, Colorectal .24, Prostate .18, Ovarian .16,
   Hepatocellular .14. Prostate patients are male, Ovarian female, the others male or female with equal odds;
   2 % of those others are recorded as sex "other" (their blood follows the sex drawn).
   Age ~ Normal(64, 11) years, clipped to [25, 95].
2. **Tumour markers** (log-normal around a healthy median): CEA 1.5 ng/mL, CA125 15 U/mL, AFP 4 ng/mL,
   PSA 1.0 ng/mL in men (0.02 in women). The type's own marker is raised in 85 % of its patients
   (the rest are marker-negative): PSA ×20 for Prostate, CA125 ×15 for Ovarian, AFP ×60 for Hepatocellular,
   CEA ×12 for Colorectal; Lung raises CEA ×3.
3. **Genetics**: EGFR mutated in 45 % of Lung, 3 % otherwise; KRAS in 40 % of Colorectal, 25 % of Lung,
   5 % otherwise; TP53 in 40 % of everyone, independent of type.
   So `tumor_type` is driven by PSA, CA125, AFP, CEA and EGFR_mutation (each class by its own marker).
4. **Imaging**: 8 % show no lesion (size 0 mm, shape "none", no necrosis). Otherwise the true size ~ LogNormal
   (median 35 mm), clipped to [3, 150], measured with Normal(0, 1.5) mm error; necrosis with probability
   sigmoid((size - 50) / 12); shape irregular or lobulated more often the larger the lesion.
5. **Stage** (head `stage`) from the true size: T1 ≤ 20 mm < T2 ≤ 50 mm < T3 ≤ 70 mm < T4; "None" without a lesion.
   So `stage` is driven by tumor_size_mm.
6. **Metastasis** (head `metastasis_organ`): none without a lesion; otherwise present with probability
   sigmoid(-2.2 + 0.045 (size - 35) + 1.3 TP53 + 0.9 necrosis + 0.8 [irregular]). Its organ follows the primary:
   Lung → Brain .55 / Bone .25 / Liver .20 (Brain .75 when EGFR-mutated), Colorectal → Liver .70 / Lung .30,
   Prostate → Bone .85 / Lung .15, Ovarian → Liver .60 / Lung .40, Hepatocellular → Lung .60 / Bone .40.
   So whether there is a metastasis is driven by tumor_size_mm, TP53_mutation, necrosis_present and tumor_shape;
   which organ by the primary's markers, and Bone also by the blood counts below.
7. **Blood tests**, in the units US labs report: WBC ~ N(7000, 1800) cells/µL; RBC ~ N(4.7 men / 4.2 women, 0.4)
   10⁶/µL; haemoglobin ~ N(14.5 men / 13.0 women, 1.1) g/dL; platelets ~ N(260000, 60000) cells/µL. Bone metastasis (marrow infiltration) lowers haemoglobin
   by 2.5 g/dL and RBC by 0.7.
8. **Missingness**: each optional value (markers, blood tests, mutations) is absent in 3 % of records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from core.cards.tabular import BoolFeature, CategoryFeature, FeatureSpec, NumberFeature, sex_codes

TUMOR_TYPES: tuple[str, ...] = ("Lung", "Colorectal", "Prostate", "Ovarian", "Hepatocellular")
TYPE_PRIORS = (0.28, 0.24, 0.18, 0.16, 0.14)
ORGANS: tuple[str, ...] = ("Brain", "Lung", "Liver", "Bone", "None")
STAGES: tuple[str, ...] = ("T1", "T2", "T3", "T4", "None")
SHAPES: tuple[str, ...] = ("none", "round", "oval", "lobulated", "irregular")
GENDERS: tuple[str, ...] = ("male", "female", "other")
OTHER_SEX_RATE = 0.02
STAGE_LIMITS_MM = (20.0, 50.0, 70.0)
MISSING_RATE = 0.03

MARKER_MEDIANS = {"CEA": 1.5, "CA125": 15.0, "AFP": 4.0, "PSA": 1.0}
OWN_MARKER = {"Prostate": ("PSA", 20.0), "Ovarian": ("CA125", 15.0), "Hepatocellular": ("AFP", 60.0),
              "Colorectal": ("CEA", 12.0), "Lung": ("CEA", 3.0)}
ORGAN_SPREAD = {
    "Lung": {"Brain": 0.55, "Bone": 0.25, "Liver": 0.20},
    "Colorectal": {"Liver": 0.70, "Lung": 0.30},
    "Prostate": {"Bone": 0.85, "Lung": 0.15},
    "Ovarian": {"Liver": 0.60, "Lung": 0.40},
    "Hepatocellular": {"Lung": 0.60, "Bone": 0.40},
}
EGFR_LUNG_SPREAD = {"Brain": 0.75, "Bone": 0.15, "Liver": 0.10}

DRIVERS: dict[str, dict[str, tuple[str, ...]]] = {
    "tumor_type": {"Lung": ("genetic_markers.EGFR_mutation", "tumor_markers.CEA"), "Colorectal": ("tumor_markers.CEA",),
                   "Prostate": ("tumor_markers.PSA",), "Ovarian": ("tumor_markers.CA125",),
                   "Hepatocellular": ("tumor_markers.AFP",)},
    "metastasis_organ": {"None": ("imaging_features.tumor_size_mm", "genetic_markers.TP53_mutation",
                                  "imaging_features.necrosis_present", "imaging_features.tumor_shape"),
                         "Bone": ("blood_test.hemoglobin",)},
    "stage": {stage: ("imaging_features.tumor_size_mm",) for stage in STAGES[:4]},
}
"""Per head and class: the features the rules above make drive that class's margin; they should rank first by mean
|SHAP|. (Stage None, no lesion, is told equally by size 0 and shape "none", so either may carry it.)"""


def _number(name: str, group: str, unit: str, low: float, high: float, optional: bool, description: str) -> NumberFeature:
    return NumberFeature(name=name, group=group, unit=unit, min=low, max=high, optional=optional, description=description)


def _flag(name: str, description: str) -> BoolFeature:
    return BoolFeature(name=name, group="genetic_markers", optional=True, description=description)


SPEC_FEATURES: tuple[FeatureSpec, ...] = (
    _number("age", "demographics", "years", 0, 120, False, "age at presentation"),
    CategoryFeature(name="gender", group="demographics", categories=list(GENDERS), codes=sex_codes(list(GENDERS)),
                    description="administrative sex; DICOM / HL7 codes M, F, O accepted"),
    _number("tumor_markers.CEA", "tumor_markers", "ng/mL", 0, 100_000, True, "carcinoembryonic antigen"),
    _number("tumor_markers.CA125", "tumor_markers", "U/mL", 0, 100_000, True, "cancer antigen 125"),
    _number("tumor_markers.AFP", "tumor_markers", "ng/mL", 0, 1_000_000, True, "alpha-fetoprotein"),
    _number("tumor_markers.PSA", "tumor_markers", "ng/mL", 0, 10_000, True, "prostate-specific antigen"),
    _number("blood_test.WBC", "blood_test", "/uL", 0, 500_000, True, "white blood cells per microlitre"),
    _number("blood_test.RBC", "blood_test", "10^6/uL", 0, 10, True, "red blood cells, millions per microlitre"),
    _number("blood_test.hemoglobin", "blood_test", "g/dL", 0, 25, True, "haemoglobin"),
    _number("blood_test.platelet", "blood_test", "/uL", 0, 3_000_000, True, "platelets per microlitre"),
    _flag("genetic_markers.EGFR_mutation", "EGFR mutated"),
    _flag("genetic_markers.TP53_mutation", "TP53 mutated"),
    _flag("genetic_markers.KRAS_mutation", "KRAS mutated"),
    _number("imaging_features.tumor_size_mm", "imaging_features", "mm", 0, 300, False, "largest lesion diameter"),
    CategoryFeature(name="imaging_features.tumor_shape", group="imaging_features", categories=list(SHAPES),
                    description="lesion shape; none when no lesion is seen"),
    BoolFeature(name="imaging_features.necrosis_present", group="imaging_features"),
)
"""SPEC.md's nested biomarker schema."""


@dataclass(frozen=True)
class Cohort:
    """Records in the request's nested shape, and each head's label (class names)."""

    records: list[dict[str, Any]]
    labels: dict[str, list[str]]


def generate_cohort(n: int, seed: int) -> Cohort:
    """`n` synthetic patients following the module's rules; the same (n, seed) always gives the same cohort."""
    rng = np.random.default_rng(seed)
    tumour = rng.choice(len(TUMOR_TYPES), size=n, p=TYPE_PRIORS)
    types = [TUMOR_TYPES[t] for t in tumour]
    female = np.where(tumour == TUMOR_TYPES.index("Prostate"), False,
                      np.where(tumour == TUMOR_TYPES.index("Ovarian"), True, rng.random(n) < 0.5))
    age = np.clip(rng.normal(64, 11, n), 25, 95)

    markers = {name: median * np.exp(rng.normal(0, 0.45, n)) for name, median in MARKER_MEDIANS.items()}
    markers["PSA"] = np.where(female, 0.02, 1.0) * markers["PSA"]
    raised = rng.random(n) < 0.85
    for i, kind in enumerate(types):
        marker, factor = OWN_MARKER[kind]
        if raised[i] or kind == "Lung":
            markers[marker][i] *= factor * np.exp(rng.normal(0, 0.4))

    lung, colorectal = tumour == TUMOR_TYPES.index("Lung"), tumour == TUMOR_TYPES.index("Colorectal")
    egfr = rng.random(n) < np.where(lung, 0.45, 0.03)
    kras = rng.random(n) < np.where(colorectal, 0.40, np.where(lung, 0.25, 0.05))
    tp53 = rng.random(n) < 0.40

    lesion = rng.random(n) >= 0.08
    true_size = np.where(lesion, np.clip(35.0 * np.exp(rng.normal(0, 0.55, n)), 3, 150), 0.0)
    measured = np.where(lesion, np.clip(true_size + rng.normal(0, 1.5, n), 1, 300), 0.0)
    necrosis = lesion & (rng.random(n) < _sigmoid((true_size - 50) / 12))
    rough = rng.random(n) < _sigmoid((true_size - 45) / 15)
    shape = np.where(~lesion, 0, np.where(rough, rng.choice([3, 4], n), rng.choice([1, 2], n)))

    stage = np.where(lesion, np.searchsorted(STAGE_LIMITS_MM, true_size), STAGES.index("None"))
    irregular = shape == SHAPES.index("irregular")
    risk = _sigmoid(-2.2 + 0.045 * (true_size - 35) + 1.3 * tp53 + 0.9 * necrosis + 0.8 * irregular)
    metastatic = lesion & (rng.random(n) < risk)
    organ = [_spread(kind, bool(e), rng) if m else "None" for kind, e, m in zip(types, egfr, metastatic)]
    bone = np.array([o == "Bone" for o in organ])

    blood = {
        "WBC": rng.normal(7000, 1800, n).clip(500, None),
        "RBC": (np.where(female, 4.2, 4.7) + rng.normal(0, 0.4, n) - 0.7 * bone).clip(1.5, None),
        "hemoglobin": (np.where(female, 13.0, 14.5) + rng.normal(0, 1.1, n) - 2.5 * bone).clip(4.0, None),
        "platelet": rng.normal(260_000, 60_000, n).clip(20_000, None),
    }
    absent = rng.random((n, 11)) < MISSING_RATE
    either_sex = ~np.isin(tumour, [TUMOR_TYPES.index("Prostate"), TUMOR_TYPES.index("Ovarian")])
    sex = np.where(either_sex & (rng.random(n) < OTHER_SEX_RATE), GENDERS.index("other"), female.astype(int))
    records = []
    for i in range(n):
        optional = [float(markers[k][i]) for k in MARKER_MEDIANS] + [float(blood[k][i]) for k in blood] + \
                   [bool(egfr[i]), bool(tp53[i]), bool(kras[i])]
        kept = [None if absent[i, j] else round(v, 3) if isinstance(v, float) else v for j, v in enumerate(optional)]
        records.append({
            "age": round(float(age[i]), 1),
            "gender": GENDERS[int(sex[i])],
            "tumor_markers": dict(zip(MARKER_MEDIANS, kept[0:4])),
            "blood_test": dict(zip(blood, kept[4:8])),
            "genetic_markers": dict(zip(("EGFR_mutation", "TP53_mutation", "KRAS_mutation"), kept[8:11])),
            "imaging_features": {"tumor_size_mm": round(float(measured[i]), 1), "tumor_shape": SHAPES[shape[i]],
                                 "necrosis_present": bool(necrosis[i])},
        })
    return Cohort(records, {"tumor_type": types, "metastasis_organ": organ, "stage": [STAGES[s] for s in stage]})


def _spread(kind: str, egfr: bool, rng: np.random.Generator) -> str:
    """The organ a metastasis of this primary goes to."""
    spread = EGFR_LUNG_SPREAD if kind == "Lung" and egfr else ORGAN_SPREAD[kind]
    return str(rng.choice(list(spread), p=list(spread.values())))


def _sigmoid(x: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))
