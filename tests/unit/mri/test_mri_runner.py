"""MRISegmenter in-process with the demo model: sliding-window probabilities, Grad-CAM, progress and real cancel."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from core.errors import ModelNotLoaded
from state.tasks import TaskCancelled, TaskStore
from preprocessing.volumes import prepare_labels, prepare_volume
from runners import mri as mri_runner
from runners import mri_model
from tests.unit.mri.mri_inputs import LIMITS
from training_export.synthetic_mri import synthetic_case
from training_export.train_mri import dice


@pytest.fixture(scope="module")
def runner(mri_model_tag: str):
    return mri_runner.MRISegmenter()


@pytest.fixture(scope="module")
def prepared(runner):
    case = synthetic_case(123_456, (96, 96, 64), (2.0, 2.0, 2.0))
    card = runner.served.current.card
    return case, card, prepare_volume(case.volume, card.input, LIMITS.max_volume_voxels)


def test_describe(runner, mri_model_tag: str) -> None:
    described = asyncio.run(runner.describe())
    assert described["loaded"] and described["tag"] == mri_model_tag and described["engine"] == "onnxruntime-cpu"
    assert described["generation"] >= 1 and described["last_error"] is None
    assert described["gradcam_layer"] == "up_layers.1" and described["card"]["task"] == "mri_segmentation"


def test_segment_finds_the_tumour(runner, prepared) -> None:
    case, card, volume = prepared
    probabilities = runner.segment(volume.tensor)
    assert probabilities.dtype == np.float16 and probabilities.shape == (4, *volume.tensor.shape[1:])
    np.testing.assert_allclose(probabilities.astype(np.float32).sum(axis=0), 1.0, atol=1e-2)
    predicted = np.asarray(card.channel_values())[probabilities.argmax(axis=0)] > 0
    truth = prepare_labels(case.labels, case.volume.affine, card.input) > 0
    assert dice(predicted, truth) > 0.7
    assert asyncio.run(runner.describe())["avg_inference_time_ms_per_image"] > 0


def test_explain_gives_a_unit_map(runner, prepared) -> None:
    _, _, volume = prepared
    crop = volume.tensor[:, 16:52, 16:52, 8:40]
    attention = runner.explain(crop)
    assert attention.shape == crop.shape[1:] and attention.min() == 0.0 and attention.max() == 1.0


def test_window_count_matches_monai(runner, prepared, tmp_path) -> None:
    _, card, volume = prepared
    calls = []
    original = runner.served.current.engine.predict
    runner.served.current.engine.predict = lambda windows: calls.append(len(windows)) or original(windows)
    try:
        runner.segment(volume.tensor)
    finally:
        runner.served.current.engine.predict = original
    spec = card.inference
    assert sum(calls) == mri_model.window_count(volume.tensor.shape[1:], spec.roi_size, spec.overlap)
    assert mri_model.window_count((10, 10, 10), (64, 64, 64), 0.25) == 1


def test_progress_and_cancel_stop_the_work(runner, tmp_path) -> None:
    card = runner.served.current.card
    volume = np.random.default_rng(0).standard_normal((4, 256, 64, 64)).astype(np.float32)  # 5 windows, 2 batches
    runner.tasks = TaskStore(tmp_path / "tasks.sqlite")
    runner.tasks.create("done", None, "mri_segmentation")
    runner.segment(volume, "done")
    record = runner.tasks.get("done")
    assert record.current_step == "inference" and 25 <= record.progress <= 85

    runner.tasks.create("stop", None, "mri_segmentation")
    batches = []
    original = runner.served.current.engine.predict

    def predict_then_cancel(windows):
        batches.append(len(windows))
        runner.tasks.cancel("stop")
        return original(windows)

    runner.served.current.engine.predict = predict_then_cancel
    try:
        with pytest.raises(TaskCancelled):
            runner.segment(volume, "stop")
        with pytest.raises(TaskCancelled):
            runner.explain(volume, "stop")
    finally:
        runner.served.current.engine.predict = original
    total = mri_model.window_count(volume.shape[1:], card.inference.roi_size, card.inference.overlap)
    assert len(batches) == 1 and total > card.inference.sw_batch_size


def test_a_runner_that_cannot_load_reports_why(monkeypatch, mri_model_tag: str) -> None:
    def broken(model):
        raise RuntimeError("weights missing")

    monkeypatch.setattr(mri_model, "load_segmenter_model", broken)
    runner = mri_runner.MRISegmenter()
    assert asyncio.run(runner.describe()) == {"loaded": False, "error": "RuntimeError: weights missing", "tag": "neuronova-mri:latest"}
    with pytest.raises(ModelNotLoaded, match="weights missing"):
        runner.segment(np.zeros((4, 8, 8, 8), np.float32))


def test_explain_needs_torch_weights(runner) -> None:
    loaded = mri_model.LoadedSegmenter(tag="x", card=runner.served.current.card, engine=runner.served.current.engine, explainer=None)
    with pytest.raises(ModelNotLoaded, match="Grad-CAM"):
        loaded.explain(np.zeros((4, 8, 8, 8), np.float32))


def test_gradcam_needs_an_existing_layer(runner) -> None:
    import torch

    from xai.segmentation_cam import SegmentationGradCam

    with pytest.raises(ValueError, match="no layer 'nope'"):
        SegmentationGradCam(torch.nn.Conv3d(4, 4, 1), "nope", [1, 2, 3], torch.device("cpu"), 8)
