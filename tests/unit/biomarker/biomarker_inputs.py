"""Request bodies shared by the biomarker tests."""

from __future__ import annotations

SPEC_EXAMPLE: dict = {
    "age": 67,
    "gender": "M",
    "tumor_markers": {"CEA": 2.1, "CA125": 12.0, "AFP": 3.5, "PSA": 28.0},
    "blood_test": {"WBC": 7500, "RBC": 4.6, "hemoglobin": 14.1, "platelet": 250000},
    "genetic_markers": {"EGFR_mutation": False, "TP53_mutation": True, "KRAS_mutation": False},
    "imaging_features": {"tumor_size_mm": 42.0, "tumor_shape": "irregular", "necrosis_present": True},
}
"""The design's biomarker request body (`biomarkers`) as written (sex coded M, blood counts per microlitre as US labs
report them), with the values of a prostate primary."""
