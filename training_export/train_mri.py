"""Train the demo MRI tumour segmenter (a small MONAI SegResNet) on synthetic cases, export it and store it.

Every case goes through preprocessing.volumes.prepare_volume / prepare_labels with the card's input spec, exactly as
the service prepares an upload, so training and serving see the same tensors. After training, further cases calibrate
the out-of-distribution threshold (core.volume_ood) and the uncertainty volume-interval margins
(postprocessing.uncertainty); held-out cases never used for either give the card's metrics: Dice (whole tumour,
tumour core, enhancing tumour) by sliding-window inference as served, the uncertainty map's AUROC for wrong voxels,
the WT interval's coverage and the OOD false-alarm rate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from sklearn.metrics import roc_auc_score

from core import store
from core.cards.base import DEMO_INTENDED_USE, Provenance
from core.cards.segmentation import (
    MRI_SEQUENCES,
    SegmentationArchitecture,
    SegmentationCard,
    SlidingWindowSpec,
    VolumeInputSpec,
    VolumeIntervalCalibration,
)
from core.networks import build_module
from core.volume_ood import VolumeOodCalibration, calibrate_volume_ood, descriptor_names, volume_descriptors
from postprocessing.uncertainty import (
    flip_passes,
    interval_margin,
    normalised_entropy,
    pass_region_volumes,
    region_channels,
    volume_interval,
)
from preprocessing.volumes import prepare_labels, prepare_volume
from training_export.onnx_export import check_parity, export_onnx
from training_export.synthetic_mri import synthetic_case
from training_export.train_ct import torch_threads

log = logging.getLogger(__name__)

MODEL_NAME = "neuronova-mri"
SEGRESNET_KWARGS: dict = {
    "spatial_dims": 3, "in_channels": len(MRI_SEQUENCES), "out_channels": 4, "init_filters": 8,
    "blocks_down": [1, 1, 1, 1], "blocks_up": [1, 1, 1],
}
Grid = tuple[tuple[int, int, int], tuple[float, float, float]]
_HELDOUT_SEED_OFFSET = 100_000
CALIBRATION_SEED_OFFSET = 200_000
INTERVAL_COVERAGE = 90.0
PARITY_ATOL = 1e-3
"""ONNX vs torch tolerance on logits: 3D convolutions sum thousands of float32 terms per voxel."""
_UNLIMITED_VOXELS = 2**40


@dataclass(frozen=True)
class TrainingConfig:
    """Data sizes and optimisation settings; the defaults are the demo model's."""

    n_train: int = 32
    n_heldout: int = 16
    n_calibration: int = 40
    """Further synthetic cases the OOD threshold and the uncertainty volume margin are calibrated on."""
    train_grids: tuple[Grid, ...] = (((96, 96, 72), (2.0, 2.0, 2.0)), ((64, 64, 48), (3.0, 3.0, 3.0)))
    heldout_grid: Grid = ((96, 96, 72), (2.0, 2.0, 2.0))
    input_spec: VolumeInputSpec = field(default_factory=lambda: VolumeInputSpec(target_spacing_mm=(3.0, 3.0, 3.0)))
    inference: SlidingWindowSpec = field(default_factory=lambda: SlidingWindowSpec(roi_size=(64, 64, 64)))
    crop_size: tuple[int, int, int] = (32, 32, 32)
    steps: int = 800
    batch_size: int = 4
    learning_rate: float = 4e-3
    tumour_crop_share: float = 0.4
    sequence_dropout: float = 0.0
    """Probability of zeroing 1..C-1 sequences of a training crop; the card records it, and only with it > 0 are the
    sequences optional. The demo model uses 0: every sequence is required (docs/performance.md, MRI trust)."""
    threads: int = 1
    """One thread: on a small shared CPU two threads thrash (measured 5-12 s per step instead of 0.7 s)."""


QUICK_CONFIG = TrainingConfig(
    n_train=2, n_heldout=1, n_calibration=10, train_grids=(((32, 32, 24), (6.0, 6.0, 6.0)),),
    heldout_grid=((32, 32, 24), (6.0, 6.0, 6.0)), input_spec=VolumeInputSpec(target_spacing_mm=(6.0, 6.0, 6.0)),
    inference=SlidingWindowSpec(roi_size=(16, 16, 16)), crop_size=(16, 16, 16), steps=2,
)
"""Tiny cases and two steps: exercises the whole path in seconds (unit tests)."""


@dataclass(frozen=True)
class PreparedCase:
    """A case on the model grid: (C, X, Y, Z) input and (X, Y, Z) output-channel indices."""

    tensor: np.ndarray
    target: np.ndarray


def demo_card(
    config: TrainingConfig, metrics: dict[str, float], ood: VolumeOodCalibration | None = None,
    intervals: VolumeIntervalCalibration | None = None,
) -> SegmentationCard:
    """The card says what training did: sequence dropout (and so which sequences may be missing), calibrations."""
    tolerant = config.sequence_dropout > 0
    input_spec = config.input_spec.model_copy(update={
        "sequence_dropout": config.sequence_dropout,
        "optional_sequences": list(config.input_spec.sequences) if tolerant else [],
    })
    return SegmentationCard(
        name="NeuroNova demo brain-tumour segmenter (MONAI SegResNet, 4 MRI sequences)",
        intended_use=DEMO_INTENDED_USE,
        provenance=Provenance(
            source="NeuroNova training_export.train_mri", licence="Apache-2.0",
            training_date=datetime.now(UTC).date().isoformat(),
            data_description=f"{config.n_train} synthetic 4-sequence brain MRI cases with BraTS-style tumour labels "
                             f"(training_export.synthetic_mri), sequence dropout {config.sequence_dropout}; "
                             f"OOD threshold and volume-interval margins from {config.n_calibration} other cases; "
                             f"held-out metrics on {config.n_heldout} more",
            synthetic_data=True,
        ),
        metrics=metrics, input=VolumeInputSpec.model_validate(input_spec.model_dump()), inference=config.inference,
        torch=SegmentationArchitecture(kwargs=SEGRESNET_KWARGS), ood=ood, volume_interval=intervals,
    )


def prepare_case(seed: int, grid: Grid, card: SegmentationCard) -> PreparedCase:
    """Generate a case and prepare it through the serving path; labels become output-channel indices."""
    case = synthetic_case(seed, *grid)
    prepared = prepare_volume(case.volume, card.input, _UNLIMITED_VOXELS)
    labels = prepare_labels(case.labels, case.volume.affine, card.input)
    channel_of_value = np.zeros(256, dtype=np.int64)
    for label in card.labels:
        channel_of_value[label.value] = label.channel
    return PreparedCase(tensor=prepared.tensor, target=channel_of_value[labels])


def _crop(case: PreparedCase, roi: tuple[int, int, int], rng: np.random.Generator, tumour_share: float) -> tuple[np.ndarray, np.ndarray]:
    """A roi-sized crop, centred on a tumour voxel with probability `tumour_share` (zero-padded at the edges)."""
    pad = [(0, 0)] + [(r // 2, r // 2) for r in roi]
    tensor, target = np.pad(case.tensor, pad), np.pad(case.target, pad[1:])
    tumour = np.argwhere(case.target > 0)
    if len(tumour) and rng.random() < tumour_share:
        center = tumour[rng.integers(len(tumour))]
    else:
        center = np.array([rng.integers(n) for n in case.target.shape])
    box = tuple(slice(int(c), int(c) + r) for c, r in zip(center, roi))
    return tensor[(slice(None), *box)], target[box]


def _batch(cases: list[PreparedCase], config: TrainingConfig, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = [], []
    for index in rng.integers(len(cases), size=config.batch_size):
        tensor, target = _crop(cases[index], config.crop_size, rng, config.tumour_crop_share)
        if rng.random() < config.sequence_dropout:
            dropped = rng.choice(len(tensor), size=rng.integers(1, len(tensor)), replace=False)
            tensor = tensor.copy()
            tensor[dropped] = 0.0
        flipped = tuple(axis for axis in range(3) if rng.random() < 0.5)
        if flipped:
            tensor, target = np.flip(tensor, tuple(a + 1 for a in flipped)), np.flip(target, flipped)
        inputs.append(np.ascontiguousarray(tensor))
        targets.append(np.ascontiguousarray(target))
    return torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(targets))[:, None]


def train_segmenter(cases: list[PreparedCase], config: TrainingConfig, seed: int) -> torch.nn.Module:
    """AdamW + one-cycle LR on Dice + cross-entropy over random crops; returns the module in eval mode."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_module(SegmentationArchitecture(kwargs=SEGRESNET_KWARGS))
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.learning_rate, total_steps=config.steps)
    model.train()
    for step in range(config.steps):
        inputs, targets = _batch(cases, config, rng)
        loss = loss_function(model(inputs), targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 20 == 0 or step == config.steps - 1:
            log.info("step %d/%d: loss %.4f", step + 1, config.steps, loss.item())
    return model.eval()


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    total = int(predicted.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(predicted, truth).sum()) / total


@dataclass(frozen=True)
class CaseOutcome:
    """What one held-out or calibration case gave under the test-time-augmentation passes."""

    dice: dict[str, float]
    descriptors: np.ndarray | None
    uncertainty_auroc: float | None
    """How well the uncertainty map ranks the plain pass's wrong brain voxels above its right ones (None: all right)."""
    pass_volumes: dict[str, np.ndarray]
    true_volumes: dict[str, float]


def torch_segmenter(model: torch.nn.Module, card: SegmentationCard) -> Callable[[np.ndarray, int], np.ndarray]:
    """(C, X, Y, Z) -> (K, X, Y, Z) softmax probabilities by sliding-window inference, as the runner serves."""
    spec = card.inference
    inferer = SlidingWindowInferer(roi_size=spec.roi_size, sw_batch_size=spec.sw_batch_size, overlap=spec.overlap,
                                   mode=spec.mode)

    def segment(volume: np.ndarray, _pass: int) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(inferer(torch.from_numpy(volume)[None], model)[0], dim=0).numpy()

    return segment


def case_outcome(passes: np.ndarray, case: PreparedCase, card: SegmentationCard) -> CaseOutcome:
    """Dice of the plain pass, OOD descriptors, uncertainty AUROC over the brain, and pass / true region volumes."""
    voxel_ml = float(np.prod(card.input.target_spacing_mm)) / 1000.0
    predicted = passes[0].argmax(0)
    channels = region_channels(card)
    brain = np.any(case.tensor != 0, axis=0)
    wrong = (predicted != case.target)[brain]
    auroc = float(roc_auc_score(wrong, normalised_entropy(passes)[brain])) if 0 < wrong.sum() < wrong.size else None
    return CaseOutcome(
        dice={region: dice(np.isin(predicted, c), np.isin(case.target, c)) for region, c in channels.items()},
        descriptors=volume_descriptors(case.tensor, passes[0], voxel_ml), uncertainty_auroc=auroc,
        pass_volumes=pass_region_volumes(passes, card, voxel_ml),
        true_volumes={region: float(np.isin(case.target, c).sum() * voxel_ml) for region, c in channels.items()},
    )


def run_cases(
    segment: Callable[[np.ndarray, int], np.ndarray], cases: list[PreparedCase], card: SegmentationCard
) -> list[CaseOutcome]:
    return [case_outcome(flip_passes(segment, case.tensor), case, card) for case in cases]


def calibrate_intervals(outcomes: list[CaseOutcome], coverage: float = INTERVAL_COVERAGE) -> VolumeIntervalCalibration:
    """Per-region conformal margin of the test-time-augmentation volume interval on labelled calibration cases."""
    margins = {region: round(interval_margin([o.pass_volumes[region] for o in outcomes],
                                             [o.true_volumes[region] for o in outcomes], coverage), 4)
               for region in outcomes[0].pass_volumes}
    return VolumeIntervalCalibration(margins=margins, coverage=coverage, n_cases=len(outcomes))


def heldout_metrics(
    outcomes: list[CaseOutcome], ood: VolumeOodCalibration | None, intervals: VolumeIntervalCalibration | None
) -> dict[str, float]:
    """Mean Dice per region, mean uncertainty AUROC, WT interval coverage and the OOD false-alarm rate."""
    metrics = {f"dice_{region.lower()}": round(float(np.mean([o.dice[region] for o in outcomes])), 4)
               for region in outcomes[0].dice}
    aurocs = [o.uncertainty_auroc for o in outcomes if o.uncertainty_auroc is not None]
    if aurocs:
        metrics["uncertainty_auroc"] = round(float(np.mean(aurocs)), 4)
    margin = intervals.margins["WT"] if intervals is not None else 0.0
    covered = [volume_interval(o.pass_volumes["WT"], margin) for o in outcomes]
    metrics["wt_interval_coverage"] = round(float(np.mean(
        [low <= o.true_volumes["WT"] <= high for (low, high), o in zip(covered, outcomes)])), 4)
    if ood is not None:
        metrics["ood_false_alarms"] = round(float(np.mean([ood.flags(o.descriptors) for o in outcomes])), 4)
    return metrics


def train_and_save(config: TrainingConfig = TrainingConfig(), seed: int = 0, name: str = MODEL_NAME) -> str:
    """Generate, train, evaluate on held-out cases, export ONNX (parity-checked) + torch weights, store; return the tag."""
    started = time.perf_counter()
    with torch_threads(config.threads):
        tag = _train_and_save(config, seed, name)
    log.info("saved %s in %.1f s total", tag, time.perf_counter() - started)
    return tag


def _train_and_save(config: TrainingConfig, seed: int, name: str) -> str:
    started = time.perf_counter()
    card = demo_card(config, {})
    grids = config.train_grids
    train_cases = [prepare_case(seed * 1000 + i, grids[i % len(grids)], card) for i in range(config.n_train)]
    heldout = [prepare_case(_HELDOUT_SEED_OFFSET + seed * 1000 + i, config.heldout_grid, card) for i in range(config.n_heldout)]
    calibration = [prepare_case(CALIBRATION_SEED_OFFSET + seed * 1000 + i, config.heldout_grid, card)
                   for i in range(config.n_calibration)]
    log.info("prepared %d + %d + %d cases in %.1f s", len(train_cases), len(heldout), len(calibration),
             time.perf_counter() - started)
    model = train_segmenter(train_cases, config, seed)
    segment = torch_segmenter(model, card)
    calibrated = run_cases(segment, calibration, card)
    ood = calibrate_volume_ood([o.descriptors for o in calibrated], descriptor_names(card.input.sequences))
    intervals = calibrate_intervals(calibrated)
    metrics = {**heldout_metrics(run_cases(segment, heldout, card), ood, intervals),
               "heldout_cases": float(config.n_heldout)}
    log.info("held-out metrics %s after %.1f s", metrics, time.perf_counter() - started)
    card = demo_card(config, metrics, ood, intervals)
    example = torch.zeros((1, len(card.input.sequences), *card.inference.roi_size))
    with TemporaryDirectory(prefix="neuronova-mri-") as folder:
        onnx_path = export_onnx(model, example, Path(folder) / card.model_file)
        parity_inputs = np.random.default_rng(seed).standard_normal((2, *example.shape[1:])).astype(np.float32)
        check_parity(model, onnx_path, parity_inputs, atol=PARITY_ATOL)
        weights_path = Path(folder) / card.torch.weights_file
        torch.save(model.state_dict(), weights_path)
        return store.save_model(name, card, {card.model_file: onnx_path, card.torch.weights_file: weights_path})
