"""The demo segmenter's training path, quickly: shared preprocessing, crops, Dice, store entry with ONNX + torch."""

from __future__ import annotations

import dataclasses

import bentoml
import numpy as np
import pytest
import torch

from core import store
from core.cards.base import DEMO_INTENDED_USE
from core.cards.segmentation import MRI_SEQUENCES, SegmentationCard
from core.networks import load_module
from training_export import train_mri
from training_export.onnx_export import onnx_cpu_session

QUICK_NAME = "test-mri-quick"


def test_dice() -> None:
    a = np.array([1, 1, 0, 0], bool)
    assert train_mri.dice(a, a) == 1.0 and train_mri.dice(a, ~a) == 0.0
    assert train_mri.dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert train_mri.dice(a, np.array([1, 0, 0, 0], bool)) == pytest.approx(2 / 3)


def test_prepared_case_uses_output_channels_and_crops_pad() -> None:
    config = train_mri.QUICK_CONFIG
    card = train_mri.demo_card(config, {})
    case = train_mri.prepare_case(1, config.train_grids[0], card)
    assert case.tensor.shape[0] == 4 and case.tensor.shape[1:] == case.target.shape
    assert set(np.unique(case.target)) <= {0, 1, 2, 3}
    rng = np.random.default_rng(0)
    tensor, target = train_mri._crop(case, (40, 40, 40), rng, tumour_share=1.0)
    assert tensor.shape == (4, 40, 40, 40) and target.shape == (40, 40, 40) and target.any()
    inputs, targets = train_mri._batch([case], train_mri.TrainingConfig(batch_size=3, sequence_dropout=1.0,
                                                                          crop_size=(16, 16, 16)), rng)
    assert inputs.shape == (3, 4, 16, 16, 16) and targets.shape == (3, 1, 16, 16, 16)
    assert all((inputs[i].flatten(1).abs().sum(1) == 0).any() for i in range(3))  # a channel dropped in each


def test_card_tells_whether_training_used_sequence_dropout() -> None:
    strict = train_mri.demo_card(train_mri.QUICK_CONFIG, {})
    assert strict.input.sequence_dropout == 0.0 and strict.input.required_sequences() == list(MRI_SEQUENCES)
    tolerant = train_mri.demo_card(dataclasses.replace(train_mri.QUICK_CONFIG, sequence_dropout=0.2), {})
    assert tolerant.input.sequence_dropout == 0.2 and tolerant.input.required_sequences() == []


@pytest.fixture()
def quick_tag():
    tag = train_mri.train_and_save(train_mri.QUICK_CONFIG, seed=0, name=QUICK_NAME)
    yield tag
    bentoml.models.delete(tag)


def test_quick_train_and_save_stores_a_servable_explainable_model(quick_tag) -> None:
    model = store.get_model(quick_tag)
    card = store.read_card(model, SegmentationCard)
    assert card.intended_use == DEMO_INTENDED_USE and card.provenance.synthetic_data
    assert {"dice_wt", "dice_tc", "dice_et", "heldout_cases", "wt_interval_coverage", "ood_false_alarms"} <= set(card.metrics)
    assert card.input.sequence_dropout == 0.0 and card.input.required_sequences() == list(card.input.sequences)
    assert card.inference.roi_size == (16, 16, 16)
    assert card.ood is not None and card.ood.n_studies == train_mri.QUICK_CONFIG.n_calibration
    assert card.volume_interval is not None and set(card.volume_interval.margins) == {"WT", "TC", "ET"}
    module = load_module(card.torch, model.path_of(card.torch.weights_file))
    assert card.torch.gradcam_layer in dict(module.named_modules())
    windows = np.random.default_rng(1).standard_normal((2, 4, 16, 16, 16)).astype(np.float32)
    session = onnx_cpu_session(model.path_of(card.model_file))
    with torch.no_grad():
        expected = module(torch.from_numpy(windows)).numpy()
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: windows})[0], expected,
                               atol=train_mri.PARITY_ATOL)
