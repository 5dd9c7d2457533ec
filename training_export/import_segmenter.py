"""How a hospital brings its own MRI tumour segmenter: an ONNX file plus a segmentation card, checked before storing.

The graph must take (N, sequences, X, Y, Z) and give (N, labels, X, Y, Z) on the card's sliding-window ROI; it runs
once on a blank window; only then is it saved. A refusal raises ModelCardError naming the mismatch and stores nothing.
With a validation folder of in-distribution studies (each a 4D NIfTI or a sub-folder of the study's files, as they
would be uploaded), the out-of-distribution warning is calibrated on them (core.volume_ood) and stored in the card.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from monai.inferers import SlidingWindowInferer

from core import store
from core.cards.segmentation import SegmentationCard
from core.errors import ModelCardError
from core.settings import LimitSettings
from core.volume_ood import (
    MIN_CALIBRATION_STUDIES,
    VolumeOodCalibration,
    calibrate_volume_ood,
    descriptor_names,
    volume_descriptors,
    voxel_ml,
)
from preprocessing.volumes import decode_upload, prepare_volume
from training_export.import_classifier import load_card, open_session

log = logging.getLogger(__name__)


def _check_dim(what: str, graph_dim: object, card_value: int) -> None:
    if isinstance(graph_dim, int) and graph_dim != card_value:
        raise ModelCardError(f"card says {card_value} {what}, graph has {graph_dim}")


def study_uploads(path: Path) -> list[tuple[str, bytes]]:
    """One validation study as uploads: the file itself, or every file of a folder in name order."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [(file.name, file.read_bytes()) for file in files]


def segment_with_session(session: ort.InferenceSession, card: SegmentationCard, tensor: np.ndarray) -> np.ndarray:
    """(C, X, Y, Z) prepared study -> (K, X, Y, Z) probabilities by the card's sliding window on ONNX Runtime."""
    spec = card.inference
    name = session.get_inputs()[0].name
    inferer = SlidingWindowInferer(roi_size=spec.roi_size, sw_batch_size=spec.sw_batch_size, overlap=spec.overlap,
                                   mode=spec.mode)
    output = inferer(torch.from_numpy(tensor)[None],
                     lambda windows: torch.from_numpy(session.run(None, {name: windows.numpy()})[0]))[0]
    return (torch.softmax(output, dim=0) if card.output_kind == "logits" else output).numpy()


def calibrate_on_studies(session: ort.InferenceSession, card: SegmentationCard, folder: Path) -> VolumeOodCalibration:
    """OOD calibration on every study in `folder` (decoded and prepared as the service would)."""
    studies = sorted(folder.iterdir())
    if len(studies) < MIN_CALIBRATION_STUDIES:
        raise ModelCardError(f"the validation folder holds {len(studies)} studies; calibrating the out-of-distribution "
                             f"warning needs at least {MIN_CALIBRATION_STUDIES}")
    limits, rows = LimitSettings(), []
    for study in studies:
        prepared = prepare_volume(decode_upload(study_uploads(study), card.input, limits), card.input,
                                  limits.max_volume_voxels)
        rows.append(volume_descriptors(prepared.tensor, segment_with_session(session, card, prepared.tensor),
                                       voxel_ml(prepared.affine)))
        if rows[-1] is None:
            raise ModelCardError(f"validation study {study.name} has no signal")
    return calibrate_volume_ood(rows, descriptor_names(card.input.sequences))


def import_segmenter(
    model_path: Path, card: SegmentationCard | Path, name: str = "neuronova-mri", validation_dir: Path | None = None
) -> str:
    """Check the card against the ONNX segmenter, run it on one blank ROI window, calibrate the OOD warning on the
    validation studies when given, store it; return the tag."""
    model_path = Path(model_path)
    card = load_card(card, SegmentationCard)
    if card.format != "onnx" or card.torch is not None:
        raise ModelCardError("an import brings one ONNX file: set format onnx and remove `torch`")
    session = open_session(model_path)
    inputs, outputs = session.get_inputs()[0].shape, session.get_outputs()[0].shape
    if len(inputs) != 5 or len(outputs) != 5:
        raise ModelCardError(f"a 3D segmenter takes and gives rank-5 tensors; graph has {len(inputs)} -> {len(outputs)}")
    _check_dim("input sequences", inputs[1], len(card.input.sequences))
    _check_dim("output label channels", outputs[1], len(card.labels))
    roi = card.inference.roi_size
    for axis, (graph_dim, size) in enumerate(zip(inputs[2:], roi)):
        _check_dim(f"voxels on ROI axis {axis}", graph_dim, size)
    blank = np.zeros((1, len(card.input.sequences), *roi), np.float32)
    result = session.run(None, {session.get_inputs()[0].name: blank})[0]
    if result.shape != (1, len(card.labels), *roi) or not np.isfinite(result).all():
        raise ModelCardError(f"on a blank {roi} window the model gave shape {result.shape} (or non-finite values); "
                             f"expected {(1, len(card.labels), *roi)}")
    if validation_dir is not None:
        card = card.model_copy(update={"ood": calibrate_on_studies(session, card, Path(validation_dir))})
    tag = store.save_model(name, card, files={card.model_file: model_path}, labels={"origin": "import"})
    log.info("imported %s as %s", model_path.name, tag)
    return tag
