"""Train the demo models into the local model store when they are missing (used by `make serve` and the tests)."""

from __future__ import annotations

import importlib
import logging

from core import store

log = logging.getLogger(__name__)

DEMO_TRAINERS: dict[str, str] = {
    "neuronova-ct": "training_export.train_ct:train_and_save",
    "neuronova-biomarker": "training_export.train_biomarker:train_and_save",
    "neuronova-glioma-grade": "training_export.train_glioma:train_and_save",
    "neuronova-mri": "training_export.train_mri:train_and_save",
}


def ensure_demo_models(names: list[str] | None = None) -> dict[str, str]:
    """Train each named demo model (all by default) that has no stored version; return name -> status."""
    status = {}
    for name in names or list(DEMO_TRAINERS):
        if store.has_model(name):
            status[name] = "present"
            continue
        module_name, func_name = DEMO_TRAINERS[name].split(":")
        log.info("training demo model %s", name)
        status[name] = getattr(importlib.import_module(module_name), func_name)()
    return status
