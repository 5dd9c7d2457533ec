"""How a hospital brings its own MRI tumour segmenter: an ONNX file plus a segmentation card, checked before storing.

The graph must take (N, sequences, X, Y, Z) and give (N, labels, X, Y, Z) on the card's sliding-window ROI; it runs
once on a blank window; only then is it saved. A refusal raises ModelCardError naming the mismatch and stores nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from core import store
from core.cards.segmentation import SegmentationCard
from core.errors import ModelCardError
from training_export.import_classifier import load_card, open_session

log = logging.getLogger(__name__)


def _check_dim(what: str, graph_dim: object, card_value: int) -> None:
    if isinstance(graph_dim, int) and graph_dim != card_value:
        raise ModelCardError(f"card says {card_value} {what}, graph has {graph_dim}")


def import_segmenter(model_path: Path, card: SegmentationCard | Path, name: str = "neuronova-mri") -> str:
    """Check the card against the ONNX segmenter, run it on one blank ROI window, store it; return the tag."""
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
    tag = store.save_model(name, card, files={card.model_file: model_path}, labels={"origin": "import"})
    log.info("imported %s as %s", model_path.name, tag)
    return tag
