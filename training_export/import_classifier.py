"""How a hospital brings its own slice classifier: an ONNX file plus a model card, checked before anything is stored.

The card is validated against the graph (input rank, layout, size, channels, output width), the model runs on a
prepared blank slice, and an optional labelled folder measures accuracy, per-class recall, the confusion matrix and
calibration error, and calibrates the out-of-distribution warning (core.ood); only then is the model saved. A
refused import raises ModelCardError naming the mismatch and leaves the model store unchanged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnxruntime as ort
import yaml
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
from pydantic import ValidationError
from scipy.special import softmax

from core import store
from core.cards.base import CardBase
from core.cards.classification import ClassificationCard
from core.errors import ImageTooLarge, InvalidImageFormat, ModelCardError
from core.imaging import DecodedSlice, ImageSource
from core.ood import calibrate_ood
from core.settings import get_settings
from preprocessing.decode import decode_slice
from preprocessing.transforms import prepare_slice
from training_export.onnx_export import onnx_cpu_session
from training_export.train_ct import (
    classification_metrics,
    confusion_matrix,
    metric_key,
)

log = logging.getLogger(__name__)
CardT = TypeVar("CardT", bound=CardBase)

_ORT_ERRORS = (
    ort_state.Fail,
    ort_state.InvalidArgument,
    ort_state.InvalidGraph,
    ort_state.InvalidProtobuf,
    ort_state.NoSuchFile,
    ort_state.RuntimeException,
)
_PROBABILITY_TOLERANCE = 1e-3
_SMOKE_BATCH = 2
_VALIDATION_BATCH = 32
ECE_BINS = 15


def load_card(card: CardT | Path, card_type: type[CardT] = ClassificationCard) -> CardT:
    """A card object as is, or a card of `card_type` read from a .json / .yaml / .yml file and validated."""
    if isinstance(card, card_type):
        return card
    path = Path(card)
    if path.suffix.lower() not in {".json", ".yaml", ".yml"}:
        raise ModelCardError(f"card file {path.name} must be .json, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        return card_type.model_validate(raw)
    except (OSError, ValueError, yaml.YAMLError) as exc:  # ValidationError and JSONDecodeError are ValueErrors
        raise ModelCardError(f"invalid model card {path.name}: {_describe(exc)}") from exc


def _describe(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(map(str, error['loc'])) or 'card'}: {error['msg']}" for error in exc.errors(include_url=False)
        )
    return str(exc)


def open_session(model_path: Path) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for the hospital's file, or ModelCardError when it is not a loadable ONNX model."""
    if not model_path.is_file():
        raise ModelCardError(f"model file {model_path} does not exist")
    try:
        return onnx_cpu_session(model_path)
    except _ORT_ERRORS as exc:
        raise ModelCardError(f"{model_path.name} is not a loadable ONNX model: {exc}") from exc


def _static(dim: object) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _show(dims: list[object]) -> str:
    return "×".join(str(d) if _static(d) else "?" for d in dims)


def check_graph_against_card(session: ort.InferenceSession, card: ClassificationCard) -> None:
    """Raise ModelCardError naming the first disagreement between the card and the graph's declared input/output."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise ModelCardError(f"the graph has {len(inputs)} inputs; a slice classifier takes exactly one image batch")
    graph_input, spec = inputs[0], card.input
    if graph_input.type != "tensor(float)":
        raise ModelCardError(f"graph input is {graph_input.type}; the service feeds tensor(float)")
    shape = list(graph_input.shape)
    if len(shape) != 4:
        raise ModelCardError(f"card describes a rank-4 {spec.layout} input, graph input has shape [{_show(shape)}]")
    height, width, channels = (
        (shape[2], shape[3], shape[1]) if spec.layout == "NCHW" else (shape[1], shape[2], shape[3])
    )
    if (_static(channels) or spec.channels) != spec.channels:  # a dynamic axis accepts what the card says
        raise ModelCardError(
            f"card says {spec.channels}-channel {spec.layout} input, graph expects {channels} channels "
            f"(graph input shape [{_show(shape)}])"
        )
    if (_static(height) or spec.height, _static(width) or spec.width) != (spec.height, spec.width):
        raise ModelCardError(
            f"card says {spec.height}×{spec.width} input, graph expects {_show([height, width])} "
            f"(graph input shape [{_show(shape)}], layout {spec.layout})"
        )
    output_shape = list(outputs[0].shape)
    if len(output_shape) != 2:
        raise ModelCardError(f"graph output has shape [{_show(output_shape)}]; a classifier outputs (batch, classes)")
    if (_static(output_shape[1]) or len(card.labels)) != len(card.labels):
        raise ModelCardError(f"card lists {len(card.labels)} labels, graph outputs {output_shape[1]} values")


def _run(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    try:
        return np.asarray(session.run(None, {session.get_inputs()[0].name: batch})[0])
    except _ORT_ERRORS as exc:
        raise ModelCardError(f"inference on a card-prepared {tuple(batch.shape)} batch failed: {exc}") from exc


def smoke_test(session: ort.InferenceSession, card: ClassificationCard) -> None:
    """Run a batch of blank slices prepared as the card says; outputs must be finite, (batch, labels) shaped and,
    for output_kind "probabilities", rows in [0, 1] summing to 1."""
    blank = DecodedSlice(
        pixels=np.zeros((card.input.height, card.input.width), np.float32),
        intensity="display",
        source=ImageSource("png"),
    )
    batch = np.stack([prepare_slice(blank, card.input).tensor] * _SMOKE_BATCH)
    outputs = _run(session, batch)
    if outputs.shape != (_SMOKE_BATCH, len(card.labels)):
        raise ModelCardError(
            f"card lists {len(card.labels)} labels, the model returned shape {outputs.shape} "
            f"for a batch of {_SMOKE_BATCH}"
        )
    if not np.all(np.isfinite(outputs)):
        raise ModelCardError("the model returned non-finite outputs for a blank slice")
    if card.output_kind == "probabilities":
        sums = outputs.sum(axis=1)
        in_range = np.all((outputs >= -_PROBABILITY_TOLERANCE) & (outputs <= 1 + _PROBABILITY_TOLERANCE))
        if not in_range or not np.allclose(sums, 1.0, atol=_PROBABILITY_TOLERANCE):
            raise ModelCardError(
                f"card says output_kind 'probabilities', but outputs for a blank slice sum to {float(sums[0]):.4g} "
                f"(range {float(outputs.min()):.4g}..{float(outputs.max()):.4g}); use output_kind 'logits'?"
            )


def _class_folders(card: ClassificationCard, validation_dir: Path) -> dict[Path, int]:
    """Each sub-folder (named by a model label or its contract class) -> that class's model output index."""
    index_by_name = {name: i for i, name in enumerate(card.labels)}
    index_by_name.update({name: i for i, name in enumerate(card.contract_labels())})
    folders = {}
    for folder in sorted(p for p in validation_dir.iterdir() if p.is_dir()):
        if folder.name not in index_by_name:
            raise ModelCardError(
                f"validation folder {folder.name!r} is neither a model label {card.labels} "
                f"nor a contract class {card.contract_labels()}"
            )
        folders[folder] = index_by_name[folder.name]
    return folders


def _prepared_images(card: ClassificationCard, folder: Path) -> list[np.ndarray]:
    limits = get_settings().limits
    tensors = []
    for number, path in enumerate(sorted(p for p in folder.iterdir() if p.is_file()), start=1):
        try:
            image = decode_slice(
                path.read_bytes(),
                path.name,
                max_pixels=limits.max_image_pixels,
                allow_multiframe=card.input.allow_multiframe,
                modalities=card.input.modalities,
            )
        except (InvalidImageFormat, ImageTooLarge) as exc:
            raise ModelCardError(f"validation image #{number} in {folder.name!r}: {exc.message}") from exc
        tensors.append(prepare_slice(image, card.input).tensor)
    return tensors


def validation_outputs(
    session: ort.InferenceSession, card: ClassificationCard, validation_dir: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Raw model outputs (N, K) on a labelled folder prepared as the card says, and each image's true output index."""
    tensors, truth = [], []
    for folder, class_index in _class_folders(card, validation_dir).items():
        images = _prepared_images(card, folder)
        tensors += images
        truth += [class_index] * len(images)
    if not tensors:
        raise ModelCardError(f"validation folder {validation_dir} holds no images in class sub-folders")
    batch = np.stack(tensors)
    outputs = [_run(session, batch[i : i + _VALIDATION_BATCH]) for i in range(0, len(batch), _VALIDATION_BATCH)]
    return np.concatenate(outputs), np.asarray(truth)


def expected_calibration_error(probabilities: np.ndarray, truth: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the image-weighted mean gap between confidence and accuracy over equal-width confidence bins."""
    confidence, correct = probabilities.max(axis=1), probabilities.argmax(axis=1) == truth
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    gaps = [abs(correct[which == b].mean() - confidence[which == b].mean()) * np.sum(which == b)
            for b in np.unique(which)]
    return float(np.sum(gaps) / len(truth))


def validation_metrics(card: ClassificationCard, outputs: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """validation_accuracy, _macro_f1, _recall_<class>, _ece, _n and _confusion_<true>_as_<predicted>."""
    probabilities = softmax(outputs, axis=1) if card.output_kind == "logits" else outputs
    names = [metric_key(name) for name in card.contract_labels()]
    confusion = confusion_matrix(truth, probabilities.argmax(axis=1), len(names))
    metrics = {
        f"validation_{key}": value for key, value in classification_metrics(confusion, card.contract_labels()).items()
    }
    metrics["validation_ece"] = expected_calibration_error(probabilities, truth)
    metrics["validation_n"] = float(len(truth))
    for i, true_name in enumerate(names):
        for j, predicted_name in enumerate(names):
            metrics[f"validation_confusion_{true_name}_as_{predicted_name}"] = float(confusion[i, j])
    return metrics


def validated_card(session: ort.InferenceSession, card: ClassificationCard, validation_dir: Path) -> ClassificationCard:
    """The card with the folder's validation metrics added and its OOD interval calibrated on the folder's images."""
    outputs, truth = validation_outputs(session, card, validation_dir)
    return card.model_copy(update={
        "metrics": {**card.metrics, **validation_metrics(card, outputs, truth)},
        "ood": calibrate_ood(outputs, card.output_kind),
    })


def import_classifier(
    model_path: Path,
    card: ClassificationCard | Path,
    name: str = "neuronova-ct",
    validation_dir: Path | None = None,
) -> str:
    """Check the card against the ONNX model, smoke-test it, optionally measure it on a labelled folder, then store
    it as a new version of `name`; return the tag. Raises ModelCardError (and stores nothing) when refused."""
    model_path = Path(model_path)
    card = load_card(card)
    if card.format != "onnx":
        raise ModelCardError(f"card says format {card.format!r}; only ONNX classifiers can be imported")
    if card.torch is not None:
        raise ModelCardError("card names torch weights, but an import brings only the ONNX file; remove `torch`")
    session = open_session(model_path)
    check_graph_against_card(session, card)
    smoke_test(session, card)
    if validation_dir is not None:
        card = validated_card(session, card, Path(validation_dir))
    tag = store.save_model(name, card, files={card.model_file: model_path}, labels={"origin": "import"})
    log.info("imported %s as %s", model_path.name, tag)
    return tag
