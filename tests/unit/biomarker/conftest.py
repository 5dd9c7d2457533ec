"""Biomarker fixtures: both tabular models trained once per session into a private model store, and loaded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.models import ModelStore

from core import store
from core.cards.tabular import TabularCard
from preprocessing.tabular import encode_records, stack_rows
from runners.biomarker import LoadedTabular, load_tabular
from training_export import train_biomarker, train_glioma
from training_export.synthetic_biomarker import Cohort, generate_cohort


@dataclass(frozen=True)
class Trained:
    biomarker_tag: str
    glioma_tag: str
    biomarker: LoadedTabular
    glioma: LoadedTabular
    biomarker_card: TabularCard
    glioma_card: TabularCard


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """Train both models with the current code into a temporary store (seconds), load them, restore the store."""
    with BentoMLContainer.model_store.patch(ModelStore(tmp_path_factory.mktemp("biomarker-store"))):
        biomarker_tag, glioma_tag = train_biomarker.train_and_save(), train_glioma.train_and_save()
        biomarker, glioma = (load_tabular(store.get_model(tag)) for tag in (biomarker_tag, glioma_tag))
    return Trained(biomarker_tag, glioma_tag, biomarker, glioma, biomarker.card, glioma.card)


@pytest.fixture(scope="session")
def heldout() -> Cohort:
    """Synthetic patients the demo model never saw (a seed the trainer does not use)."""
    return generate_cohort(1500, seed=1234)


@pytest.fixture(scope="session")
def heldout_rows(heldout: Cohort, trained: Trained) -> np.ndarray:
    return stack_rows(encode_records(heldout.records, trained.biomarker_card))


@pytest.fixture(scope="session")
def heldout_explained(heldout_rows: np.ndarray, trained: Trained) -> np.ndarray:
    """The demo model's `explain` output for the held-out cohort (computed once)."""
    return trained.biomarker.explain(heldout_rows)
