"""The demo models: shipped with the repository as exported models (`demo_models/<name>.bentomodel`), imported into
the local model store when it lacks them (`make serve`, the tests), retrained from code on request (`make models`),
and exported back into `demo_models/` from the store (`python -m training_export export-demo`)."""

from __future__ import annotations

import importlib
import logging
import tarfile
from pathlib import Path
from typing import Any

import bentoml
import yaml

from core import store

log = logging.getLogger(__name__)

DEMO_TRAINERS: dict[str, str] = {
    "neuronova-ct": "training_export.train_ct:train_and_save",
    "neuronova-biomarker": "training_export.train_biomarker:train_and_save",
    "neuronova-glioma-grade": "training_export.train_glioma:train_and_save",
    "neuronova-mri": "training_export.train_mri:train_and_save",
}
DEMO_DIR = Path(__file__).resolve().parents[1] / "demo_models"
"""Where the shipped exports live (absolute: `bentoml models import` needs an absolute path, docs/bentoml-pitfalls.md
G15)."""


def shipped_path(name: str) -> Path:
    """The exported file of demo model `name` in the repository."""
    return DEMO_DIR / f"{name}.bentomodel"


def shipped_info(name: str) -> dict[str, Any]:
    """The shipped export's model.yaml (tag, metadata with the model card under `card`), read from the archive
    without importing it."""
    with tarfile.open(shipped_path(name)) as archive:
        member = next(m for m in archive.getmembers() if Path(m.name).name == "model.yaml")
        return yaml.safe_load(archive.extractfile(member).read())


def shipped_tag(name: str) -> str:
    info = shipped_info(name)
    return f"{info['name']}:{info['version']}"


def train(name: str) -> str:
    """Train demo model `name` from code into the store (a new version); return its tag."""
    module_name, func_name = DEMO_TRAINERS[name].split(":")
    log.info("training demo model %s", name)
    return getattr(importlib.import_module(module_name), func_name)()


def ensure_demo_models(names: list[str] | None = None, retrain: bool = False) -> dict[str, str]:
    """Make each named demo model (all by default) available in the store; return name -> what was done.

    The shipped export's version is imported when the store lacks it ("imported <tag>"; "present" when it has it).
    Without a shipped export, a name with any stored version is left alone ("present") and one without is trained
    ("trained <tag>"). `retrain` trains every named model anew whatever the store holds. The store serves its newest
    version (`<name>:latest`, by creation time), so a local retrain stays served over an older shipped model.
    """
    status = {}
    for name in names or list(DEMO_TRAINERS):
        if retrain:
            status[name] = f"trained {train(name)}"
        elif shipped_path(name).is_file():
            tag = shipped_tag(name)
            if store.has_version(tag):
                status[name] = "present"
            else:
                status[name] = f"imported {bentoml.models.import_model(str(shipped_path(name).resolve())).tag}"
        elif store.has_model(name):
            status[name] = "present"
        else:
            status[name] = f"trained {train(name)}"
    return status


def export_demo_models(names: list[str] | None = None) -> dict[str, str]:
    """Write the store's latest version of each named demo model (all by default) to `demo_models/`; return name ->
    the exported tag and file size."""
    DEMO_DIR.mkdir(exist_ok=True)
    exported = {}
    for name in names or list(DEMO_TRAINERS):
        model = store.get_model(f"{name}:latest")
        path = shipped_path(name)
        path.unlink(missing_ok=True)
        bentoml.models.export_model(model.tag, str(path.resolve()))
        exported[name] = f"{model.tag} -> {path.relative_to(DEMO_DIR.parent)} ({path.stat().st_size / 2**20:.2f} MB)"
    return exported
