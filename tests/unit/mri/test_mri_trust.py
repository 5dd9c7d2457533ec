"""Can a radiologist trust the demo segmenter's answer? Floors on held-out synthetic cases (never used in training or
calibration) through the served engine (ONNX Runtime), and the OOD warning on every foreign study."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipelines.mri import check_ood
from core import store
from core.settings import get_settings
from preprocessing.volumes import decode_upload, prepare_volume
from runners.mri_model import load_segmenter_model
from training_export.foreign_volumes import foreign_studies
from training_export.train_mri import heldout_metrics, prepare_case, run_cases

TEST_SEED_OFFSET = 400_000
N_CASES = 20
GRID = ((96, 96, 72), (2.0, 2.0, 2.0))


@pytest.fixture(scope="module")
def segmenter(mri_model_tag):
    return load_segmenter_model(store.get_model(mri_model_tag))


def test_the_demo_card_requires_every_sequence_and_is_calibrated(segmenter) -> None:
    card = segmenter.card
    assert card.input.sequence_dropout == 0.0 and card.input.required_sequences() == ["T1", "T1ce", "T2", "FLAIR"]
    assert card.ood is not None and card.ood.n_studies >= 40 and card.volume_interval is not None


def test_heldout_floors(segmenter) -> None:
    cases = [prepare_case(TEST_SEED_OFFSET + i, GRID, segmenter.card) for i in range(N_CASES)]
    outcomes = run_cases(lambda volume, _: segmenter.segment(volume, lambda *_: None), cases, segmenter.card)
    metrics = heldout_metrics(outcomes, segmenter.card.ood, segmenter.card.volume_interval)
    assert metrics["dice_wt"] >= 0.85, metrics
    assert metrics["ood_false_alarms"] <= 0.10, metrics
    assert metrics["uncertainty_auroc"] >= 0.7, metrics
    assert metrics["wt_interval_coverage"] >= 0.8, metrics


@pytest.mark.parametrize("study", foreign_studies(("T1", "T1ce", "T2", "FLAIR")), ids=lambda study: study.name)
def test_foreign_studies_are_warned(segmenter, study) -> None:
    limits = get_settings().limits
    volume = decode_upload(study.uploads, segmenter.card.input, limits, study.sequence_types)
    prepared = prepare_volume(volume, segmenter.card.input, limits.max_volume_voxels)
    checked = check_ood(prepared, segmenter.segment(prepared.tensor, lambda *_: None), segmenter.card)
    assert checked is not None and checked.flagged, checked


def test_intensity_scale_is_normalised_away(segmenter) -> None:
    """A volume stored with another intensity scale gives the same input (z-scored per sequence), so the same answer."""
    from training_export.synthetic_mri import synthetic_case

    case = synthetic_case(TEST_SEED_OFFSET, *GRID)
    scaled = dataclasses.replace(case.volume, data=case.volume.data * 1000.0)
    limits = get_settings().limits
    plain = prepare_volume(case.volume, segmenter.card.input, limits.max_volume_voxels).tensor
    np.testing.assert_allclose(prepare_volume(scaled, segmenter.card.input, limits.max_volume_voxels).tensor, plain,
                               atol=1e-4)
