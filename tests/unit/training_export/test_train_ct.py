"""The CT trainer's parts, and a quick end-to-end run into the test model store."""

from __future__ import annotations

from dataclasses import replace

import bentoml
import numpy as np
import pytest
import torch

from core import store
from core.cards import CT_CLASSES, DEMO_INTENDED_USE, ClassificationCard, ImageInputSpec
from core.networks import load_module
from core.settings import get_settings
from preprocessing.decode import decode_slice
from preprocessing.transforms import prepare_slice
from training_export import train_ct
from training_export.onnx_export import onnx_cpu_session
from training_export.synthetic_ct import generate_ct_dataset, write_ct_dicom

QUICK_NAME = "test-ct-quick"


def test_confusion_and_metrics_on_a_known_example() -> None:
    true = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 2, 2])
    confusion = train_ct.confusion_matrix(true, predicted, 4)
    assert confusion.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    metrics = train_ct.classification_metrics(confusion, CT_CLASSES)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["recall_glioma"] == pytest.approx(2 / 3)
    assert metrics["recall_meningioma"] == pytest.approx(1 / 2)
    assert metrics["recall_pituitary"] == 1.0
    assert "recall_no_tumor" not in metrics  # no examples: recall undefined, not reported
    f1 = [2 * 2 / (3 + 2), 2 * 1 / (2 + 2), 2 * 1 / (1 + 2), 0.0]
    assert metrics["macro_f1"] == pytest.approx(np.mean(f1))


def test_metric_key() -> None:
    assert train_ct.metric_key("No Tumor") == "no_tumor"


def test_training_input_equals_serving_input_of_the_same_dicom(tmp_path) -> None:
    """No train/serve skew: a HU slice prepared for training equals the same slice uploaded as DICOM and served."""
    spec = train_ct.TrainingConfig().input_spec
    hu = np.rint(generate_ct_dataset(1, seed=5, size=128)[0][1])
    write_ct_dicom(hu, tmp_path / "s.dcm")
    served = prepare_slice(
        decode_slice((tmp_path / "s.dcm").read_bytes(), max_pixels=get_settings().limits.max_image_pixels), spec
    ).tensor
    trained = train_ct.prepare_ct_batch(hu[None], spec)[0]
    assert trained.shape == (1, 224, 224)
    np.testing.assert_allclose(trained, served, atol=1e-5)


def test_heldout_set_is_reproducible_and_not_the_training_data() -> None:
    first, second = train_ct.heldout_set(0, n_per_class=1, size=64), train_ct.heldout_set(0, n_per_class=1, size=64)
    np.testing.assert_array_equal(first[0], second[0])
    training = generate_ct_dataset(1, (0, 0), size=64)
    assert not np.array_equal(first[0], training[0])
    assert first[1].dtype == bool and first[2].tolist() == [0, 1, 2, 3]


def test_augmentation_is_seeded_and_keeps_the_shape() -> None:
    image = np.random.default_rng(0).random((1, 32, 32), dtype=np.float32)
    first, second = train_ct.augmentation(3), train_ct.augmentation(3)
    outputs = [(first({"image": image})["image"], second({"image": image})["image"]) for _ in range(4)]
    for a, b in outputs:
        assert isinstance(a, torch.Tensor) and not hasattr(a, "meta") and a.shape == (1, 32, 32)
        torch.testing.assert_close(a, b)
    assert any(not torch.equal(a, torch.from_numpy(image)) for a, _ in outputs)


def centroid(weights: np.ndarray) -> np.ndarray:
    return np.array([(np.indices(weights.shape)[axis] * weights).sum() / weights.sum() for axis in range(2)])


def test_augmentation_moves_the_lesion_mask_with_the_image() -> None:
    image = np.zeros((1, 32, 32), np.float32)
    image[0, 12:20, 11:19] = 1.0  # a bright square, and its mask
    augment = train_ct.augmentation(5)
    for _ in range(6):
        sample = augment({"image": image, "mask": image.copy()})
        mask, moved = sample["mask"][0].numpy(), sample["image"][0].numpy()
        moved = moved - moved.min()  # undo the intensity shift; the scale does not move a centroid
        assert sample["mask"].shape == (1, 32, 32) and mask.sum() > 10
        np.testing.assert_allclose(centroid(mask), centroid(moved), atol=0.5)


def test_lesion_fractions_follow_the_input_size() -> None:
    masks = np.zeros((2, 64, 64), bool)
    masks[0, :32, :32] = True
    fractions = train_ct.lesion_fractions(masks, ImageInputSpec(height=16, width=16))
    assert fractions.shape == (2, 1, 16, 16) and fractions[0, 0, :8, :8].min() == 1.0 and fractions[1].max() == 0.0


def test_localisation_loss_rewards_evidence_in_the_lesion_and_only_there() -> None:
    fractions = torch.zeros((2, 1, 8, 8))
    fractions[0, 0, :2, :2] = 1.0  # image 0's lesion covers CAM grid cell (0, 0); image 1 has none
    labels = torch.tensor([1, 3])

    def loss(lesion_value: float, elsewhere: float) -> float:
        cams = torch.full((2, 4, 4, 4), elsewhere)
        cams[0, 1, 0, 0] = lesion_value  # the true class's map of image 0
        return train_ct.localisation_loss(cams, labels, fractions).item()

    assert loss(8.0, -8.0) < 0.01 < loss(0.0, 0.0) < loss(-8.0, 8.0)
    assert loss(8.0, 8.0) > loss(8.0, -8.0)  # evidence everywhere is not localised
    assert train_ct.localisation_loss(torch.ones((2, 4, 4, 4)), labels, torch.zeros((2, 1, 8, 8))).item() == 0.0


def test_cams_sum_to_the_logits_of_the_average_pooled_head() -> None:
    model = train_ct.build_model().eval()
    batch = torch.rand((2, 1, 64, 64))
    logits, cams = train_ct.logits_and_cams(model, batch)
    torch.testing.assert_close(cams.mean(dim=(2, 3)) + model.fc.bias, logits, atol=1e-5, rtol=1e-4)


def test_training_is_deterministic() -> None:
    config = train_ct.QUICK_CONFIG
    images = np.random.default_rng(0).random((8, 1, 32, 32), dtype=np.float32)
    labels = np.arange(8) % 4
    model = train_ct.train_classifier(images, labels, config, seed=1)
    first, second = model.state_dict(), train_ct.train_classifier(images, labels, config, seed=1).state_dict()
    assert not model.training
    assert not torch.equal(first["fc.weight"], train_ct.build_model().state_dict()["fc.weight"])
    for key in first:
        torch.testing.assert_close(first[key], second[key])


def test_torch_threads_restores_the_count() -> None:
    before = torch.get_num_threads()
    with train_ct.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.fixture()
def quick_tag():
    tag = train_ct.train_and_save(seed=0, config=train_ct.QUICK_CONFIG, name=QUICK_NAME)
    yield tag
    bentoml.models.delete(tag)


def test_quick_train_and_save_stores_a_servable_explainable_model(quick_tag) -> None:
    model = store.get_model(quick_tag)
    card = store.read_card(model, ClassificationCard)
    config = train_ct.QUICK_CONFIG
    assert card.labels == list(CT_CLASSES) and card.output_kind == "logits"
    assert card.intended_use == DEMO_INTENDED_USE and card.provenance.synthetic_data
    assert card.provenance.licence == "Apache-2.0" and card.provenance.training_date
    assert "heldout_set(seed=0, n_per_class=2, size=64)" in card.provenance.data_description
    assert card.input == config.input_spec
    assert card.torch.kwargs == train_ct.RESNET_KWARGS and card.torch.gradcam_layer == "layer4"
    expected = {"accuracy", "macro_f1", "onnx_max_abs_diff", "n_train", "n_test", "seed", "training_seconds"}
    assert expected <= set(card.metrics)
    assert card.metrics["n_train"] == 12 and card.metrics["n_test"] == 8
    assert card.metrics["onnx_max_abs_diff"] < 1e-4

    module = load_module(card.torch, model.path_of(card.torch.weights_file))
    assert "layer4" in dict(module.named_modules())
    _, _, labels = train_ct.heldout_set(0, n_per_class=2, size=64)
    images = train_ct.prepare_ct_batch(train_ct.heldout_set(0, n_per_class=2, size=64)[0], card.input)
    session = onnx_cpu_session(model.path_of(card.model_file))
    onnx_logits = session.run(None, {session.get_inputs()[0].name: images})[0]
    np.testing.assert_allclose(onnx_logits, train_ct.predict_logits(module, images), atol=1e-4)
    accuracy = float(np.mean(onnx_logits.argmax(axis=1) == labels))
    assert accuracy == pytest.approx(card.metrics["accuracy"])


def test_heldout_size_follows_the_config() -> None:
    config = replace(train_ct.QUICK_CONFIG, n_test_per_class=1)
    card = train_ct.build_card({"accuracy": 1.0}, config, seed=4)
    assert "heldout_set(seed=4, n_per_class=1, size=64)" in card.provenance.data_description


CT_ACCURACY_FLOOR = 0.9
"""What the demo CT classifier must reach on synthetic slices it never saw (/model_info publishes its own figure)."""


def test_the_demo_model_meets_its_floor_on_slices_it_never_saw(ct_model: str) -> None:
    model = store.get_model("neuronova-ct:latest")  # what the runner serves by default
    card = store.read_card(model, ClassificationCard)
    unseen_seed = int(card.metrics["seed"]) + 1000  # the demo trains and holds out on streams of its own seed
    hu, _, labels = train_ct.heldout_set(unseen_seed, n_per_class=10, size=train_ct.TrainingConfig().image_size)
    session = onnx_cpu_session(model.path_of(card.model_file))
    images = train_ct.prepare_ct_batch(hu, card.input)
    logits = session.run(None, {session.get_inputs()[0].name: images})[0]
    accuracy = float(np.mean(logits.argmax(axis=1) == labels))
    assert accuracy >= CT_ACCURACY_FLOOR, accuracy
