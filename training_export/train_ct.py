"""Train the demo CT slice classifier (a small MONAI 2D ResNet) on synthetic heads, export it and store it.

Every image goes through preprocessing.transforms.prepare_slice with the card's input spec, exactly as the service
prepares an uploaded DICOM slice, so training and serving see the same tensors.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import torch
from monai.networks.nets import ResNet
from monai.transforms import (
    Compose,
    EnsureTyped,
    RandAffined,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resize,
)

from core.cards import (
    CT_CLASSES,
    DEMO_INTENDED_USE,
    ClassificationCard,
    ImageInputSpec,
    Provenance,
    TorchArchitecture,
)
from core.imaging import DecodedSlice, ImageSource
from core.ood import OodCalibration, calibrate_ood
from preprocessing.transforms import prepare_slice
from training_export.onnx_export import export_and_store
from training_export.synthetic_ct import FIELD_OF_VIEW_MM, generate_ct_dataset

log = logging.getLogger(__name__)

MODEL_NAME = "neuronova-ct"
RESNET_KWARGS: dict = {
    "block": "basic",
    "layers": [1, 1, 1, 1],
    "block_inplanes": [8, 16, 32, 64],
    "spatial_dims": 2,
    "n_input_channels": 1,
    "num_classes": len(CT_CLASSES),
}
GRADCAM_LAYER = "layer4"
HELDOUT_PER_CLASS = 50
PARITY_IMAGES = 16
_TRAIN_STREAM, _HELDOUT_STREAM, _SHUFFLE_STREAM = 0, 1, 2
"""Independent random streams derived from one seed: training data, held-out data, batch order."""


@dataclass(frozen=True)
class TrainingConfig:
    """Data sizes and optimisation settings; the defaults are the demo model's."""

    n_train_per_class: int = 200
    n_test_per_class: int = HELDOUT_PER_CLASS
    image_size: int = 256
    input_spec: ImageInputSpec = field(default_factory=lambda: ImageInputSpec(modalities=["CT", "MR"]))
    """CT first (what it was trained on); MR slices are accepted and answered with a modality warning."""
    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 3e-3
    localisation_weight: float = 1.0
    """Weight of the lesion-localisation term (see localisation_loss); 0 trains on the class labels alone."""
    threads: int = 2


QUICK_CONFIG = TrainingConfig(
    n_train_per_class=3,
    n_test_per_class=2,
    image_size=64,
    input_spec=ImageInputSpec(height=64, width=64),
    epochs=1,
    batch_size=6,
)
"""A few tiny images and one epoch: exercises the whole path in seconds (unit tests)."""


def heldout_set(
    seed: int = 0, n_per_class: int = HELDOUT_PER_CLASS, size: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The held-out synthetic set of the model trained with `seed`: (HU images, lesion masks, labels)."""
    return generate_ct_dataset(n_per_class, (seed, _HELDOUT_STREAM), size)


def prepare_ct_batch(hu_images: np.ndarray, spec: ImageInputSpec) -> np.ndarray:
    """HU slices (N, H, W) -> model input (N, ...) through the serving path (prepare_slice on a CT DecodedSlice)."""
    source = ImageSource("dicom", modality="CT")
    tensors = [
        prepare_slice(
            DecodedSlice(
                pixels=hu,
                intensity="hounsfield",
                source=source,
                pixel_spacing_mm=(FIELD_OF_VIEW_MM / hu.shape[0], FIELD_OF_VIEW_MM / hu.shape[1]),
            ),
            spec,
        ).tensor
        for hu in hu_images
    ]
    return np.stack(tensors)


def build_model() -> ResNet:
    """The demo architecture (its kwargs are stored in the card so a runner can rebuild it for Grad-CAM)."""
    return ResNet(**RESNET_KWARGS)


def augmentation(seed: int) -> Compose:
    """Label-preserving augmentation of a {"image": (C, H, W) unit-range image, "mask": (1, H, W) lesion fraction}
    sample (the mask is optional and moves with the image): left-right flip (the sella stays on the midline, low),
    small rotation/shift/zoom with air (0) padding, slight intensity jitter of the image."""
    both, image = ["image", "mask"], ["image"]
    transform = Compose(
        [
            RandFlipd(keys=both, prob=0.5, spatial_axis=1, allow_missing_keys=True),
            RandAffined(
                keys=both, prob=0.7, rotate_range=0.2, translate_range=(8, 8), scale_range=(0.05, 0.05),
                padding_mode="zeros", mode=("bilinear", "bilinear"), allow_missing_keys=True,
            ),
            RandScaleIntensityd(keys=image, factors=0.08, prob=0.5),
            RandShiftIntensityd(keys=image, offsets=0.04, prob=0.5),
            EnsureTyped(keys=both, data_type="tensor", dtype=torch.float32, track_meta=False, allow_missing_keys=True),
        ]
    )
    return transform.set_random_state(seed=seed)


def lesion_fractions(masks: np.ndarray, spec: ImageInputSpec) -> np.ndarray:
    """Boolean lesion masks (N, H, W) in the source geometry -> (N, 1, height, width) lesion fraction per input pixel."""
    to_input = Resize((spec.height, spec.width), mode="area")
    return np.stack([np.asarray(to_input(mask[None].astype(np.float32)), dtype=np.float32) for mask in masks])


def logits_and_cams(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, K) and class activation maps (N, K, h, w) on the Grad-CAM layer.

    For this global-average-pool + linear head, a class's Grad-CAM is exactly its CAM (the linear weights applied
    to the layer's features) after ReLU, up to a positive factor.
    """
    captured: list[torch.Tensor] = []
    layer = dict(model.named_modules())[GRADCAM_LAYER]
    handle = layer.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        logits = model(batch)
    finally:
        handle.remove()
    return logits, torch.einsum("nfhw,kf->nkhw", captured[0], model.fc.weight)


def localisation_loss(cams: torch.Tensor, labels: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Class-balanced binary cross-entropy between each tumour image's CAM for its true class (as logits) and its
    lesion fraction on the CAM grid, averaged over the tumour images of the batch (0 when there are none).

    It teaches the model to find its evidence for a tumour class in the lesion itself: positive there, negative
    elsewhere, so that Grad-CAM (the positive part of that map) shows the lesion.
    """
    tumour = fractions.flatten(1).sum(dim=1) > 0
    if not tumour.any():
        return cams.new_zeros(())
    evidence = cams[torch.arange(len(labels)), labels][tumour]
    inside = torch.nn.functional.adaptive_avg_pool2d(fractions[tumour], evidence.shape[-2:])[:, 0]
    errors = torch.nn.functional.binary_cross_entropy_with_logits(evidence, inside, reduction="none").flatten(1)
    inside, outside = inside.flatten(1), 1 - inside.flatten(1)
    balanced = (errors * inside).sum(1) / inside.sum(1).clamp_min(1e-6) + (errors * outside).sum(1) / outside.sum(1)
    return balanced.mean() / 2


def train_classifier(
    images: np.ndarray, labels: np.ndarray, config: TrainingConfig, seed: int, fractions: np.ndarray | None = None
) -> torch.nn.Module:
    """Train the demo ResNet on prepared images (N, C, H, W) with AdamW + one-cycle LR; return it in eval mode.

    With lesion `fractions` (N, 1, H, W), the loss adds `config.localisation_weight` × localisation_loss."""
    torch.manual_seed(seed)
    model = build_model()
    augment = augmentation(seed)
    order_rng = np.random.default_rng((seed, _SHUFFLE_STREAM))
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    steps_per_epoch = math.ceil((len(images) - 1) / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=config.learning_rate, total_steps=config.epochs * steps_per_epoch, pct_start=0.2
    )
    model.train()
    for epoch in range(config.epochs):
        order, losses = order_rng.permutation(len(images)), []
        for start in range(0, len(images) - 1, config.batch_size):  # never a batch of one (BatchNorm needs two)
            batch_index = order[start : start + config.batch_size]
            samples = [augment({"image": images[i]} | ({} if fractions is None else {"mask": fractions[i]}))
                       for i in batch_index]
            batch, targets = torch.stack([sample["image"] for sample in samples]), torch.from_numpy(labels[batch_index])
            logits, cams = logits_and_cams(model, batch)
            loss = torch.nn.functional.cross_entropy(logits, targets)
            if fractions is not None and config.localisation_weight > 0:
                masks = torch.stack([sample["mask"] for sample in samples])
                loss = loss + config.localisation_weight * localisation_loss(cams, targets, masks)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
        log.info("epoch %d/%d: mean loss %.4f", epoch + 1, config.epochs, float(np.mean(losses)))
    return model.eval()


def predict_logits(model: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits (N, classes) of an eval-mode model."""
    with torch.no_grad():
        return np.concatenate(
            [model(torch.from_numpy(images[i : i + batch_size])).numpy() for i in range(0, len(images), batch_size)]
        )


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts (true class, predicted class) as an (n, n) int64 matrix."""
    return np.bincount(n_classes * np.asarray(true) + np.asarray(predicted), minlength=n_classes**2).reshape(
        n_classes, n_classes
    )


def metric_key(class_name: str) -> str:
    """A class name as a metric-key fragment ("No Tumor" -> "no_tumor")."""
    return class_name.lower().replace(" ", "_")


def classification_metrics(confusion: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """accuracy, macro_f1 and recall_<class> (classes with examples only) from a confusion matrix."""
    true_positive = np.diag(confusion).astype(float)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    f1_denominator = support + predicted
    f1 = np.divide(2 * true_positive, f1_denominator, out=np.zeros_like(true_positive), where=f1_denominator > 0)
    metrics = {"accuracy": float(true_positive.sum() / max(confusion.sum(), 1)), "macro_f1": float(f1.mean())}
    for index, name in enumerate(class_names):
        if support[index] > 0:
            metrics[f"recall_{metric_key(name)}"] = float(true_positive[index] / support[index])
    return metrics


def build_card(
    metrics: dict[str, float], config: TrainingConfig, seed: int, ood: OodCalibration | None = None
) -> ClassificationCard:
    """The demo model's card: synthetic data, demo use only, torch architecture for Grad-CAM, OOD interval from the
    held-out set."""
    description = (
        "Synthetic axial CT head slices from training_export.synthetic_ct (air, elliptical skull ring, grey/white "
        "matter texture, ventricles, sella; glioma: ragged hypodense intra-axial mass with oedema; meningioma: "
        "hyperdense extra-axial dome on the inner table; pituitary: small hyperdense midline mass at the sella). "
        "Trained on the class labels and, for tumour slices, on the lesion masks: the true class's activation map is "
        "taught to be positive in the lesion and negative elsewhere (train_ct.localisation_loss, weight "
        f"{config.localisation_weight}), so that Grad-CAM shows the evidence the model actually uses. "
        f"{config.n_train_per_class} training and {config.n_test_per_class} held-out slices per class, "
        f"{config.image_size}x{config.image_size} px, seed {seed}; held-out set = "
        f"training_export.train_ct.heldout_set(seed={seed}, n_per_class={config.n_test_per_class}, "
        f"size={config.image_size})."
    )
    return ClassificationCard(
        name="NeuroNova CT demo classifier (MONAI ResNet, synthetic data)",
        labels=list(CT_CLASSES),
        output_kind="logits",
        input=config.input_spec,
        torch=TorchArchitecture(
            factory="monai.ResNet", kwargs=RESNET_KWARGS, weights_file="model.pt", gradcam_layer=GRADCAM_LAYER
        ),
        metrics=metrics,
        ood=ood,
        provenance=Provenance(
            source="NeuroNova training_export",
            licence="Apache-2.0",
            training_date=datetime.now(UTC).date().isoformat(),
            data_description=description,
            synthetic_data=True,
        ),
        intended_use=DEMO_INTENDED_USE,
    )


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run torch on `count` intra-op threads inside the block (the machine's cores are shared)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_and_save(seed: int = 0, *, config: TrainingConfig | None = None, name: str = MODEL_NAME) -> str:
    """Generate data, train, evaluate on the held-out set, export to ONNX (parity-checked), store; return the tag."""
    config = config or TrainingConfig()
    started = time.perf_counter()
    with torch_threads(config.threads):
        train_hu, train_masks, train_labels = generate_ct_dataset(
            config.n_train_per_class, (seed, _TRAIN_STREAM), config.image_size
        )
        test_hu, _, test_labels = heldout_set(seed, config.n_test_per_class, config.image_size)
        train_images = prepare_ct_batch(train_hu, config.input_spec)
        test_images = prepare_ct_batch(test_hu, config.input_spec)
        fractions = lesion_fractions(train_masks, config.input_spec)
        model = train_classifier(train_images, train_labels, config, seed, fractions)
        test_logits = predict_logits(model, test_images)
        predicted = test_logits.argmax(axis=1)
        metrics = classification_metrics(confusion_matrix(test_labels, predicted, len(CT_CLASSES)), CT_CLASSES)
        metrics.update(
            n_train=float(len(train_labels)),
            n_test=float(len(test_labels)),
            seed=float(seed),
            training_seconds=round(time.perf_counter() - started, 1),
        )
        # Lesion supervision pushes every logit negative away from a lesion, so the energy of a foreign image falls
        # in the brain slices' range; the mean logit (overall activation) separates them (docs/performance.md).
        ood = calibrate_ood(test_logits, "logits", score="mean_logit")
        tag = export_and_store(name, model, test_images[:PARITY_IMAGES],
                               lambda difference: build_card({**metrics, "onnx_max_abs_diff": difference}, config, seed, ood))
    log.info("stored %s: %s", tag, metrics)
    return tag
