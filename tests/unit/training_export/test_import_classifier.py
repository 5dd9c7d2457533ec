"""Importing a hospital's classifier: honest cards are stored, lying cards are refused by name and store nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from core import store
from core.cards import ClassificationCard
from core.errors import ModelCardError
from training_export.import_classifier import import_classifier
from training_export.synthetic_ct import generate_ct_dataset, write_ct_dicom


def _write_card(path: Path, card: dict) -> Path:
    path.write_text(json.dumps(card) if path.suffix == ".json" else yaml.safe_dump(card), encoding="utf-8")
    return path


def test_an_honest_card_imports(foreign_logits_onnx, foreign_card, scratch_model_name) -> None:
    card = ClassificationCard.model_validate(foreign_card)
    tag = import_classifier(foreign_logits_onnx, card, name=scratch_model_name)
    model = store.get_model(tag)
    assert store.read_card(model, ClassificationCard) == card
    assert Path(model.path_of("model.onnx")).read_bytes() == foreign_logits_onnx.read_bytes()
    assert model.info.labels["origin"] == "import" and model.info.labels["synthetic"] == "false"


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_card_files_import(foreign_logits_onnx, foreign_card, scratch_model_name, tmp_path, suffix) -> None:
    card_path = _write_card(tmp_path / f"card{suffix}", foreign_card)
    tag = import_classifier(foreign_logits_onnx, card_path, name=scratch_model_name)
    assert store.read_card(store.get_model(tag), ClassificationCard).labels == foreign_card["labels"]


def test_a_softmax_model_imports_as_probabilities(foreign_probabilities_onnx, foreign_card, scratch_model_name) -> None:
    card = ClassificationCard.model_validate({**foreign_card, "output_kind": "probabilities"})
    assert import_classifier(foreign_probabilities_onnx, card, name=scratch_model_name).startswith(scratch_model_name)


def _lie(card: dict, **input_changes) -> dict:
    return {**card, "input": {**card["input"], **input_changes}}


def _three_labels(card: dict) -> dict:
    return {**card, "labels": card["labels"][:3], "label_map": {k: card["label_map"][k] for k in card["labels"][:3]}}


LIES = {
    "size": (lambda c: _lie(c, height=40, width=40), "card says 40×40 input, graph expects 32×32"),
    "channels": (lambda c: _lie(c, channels=1), "card says 1-channel NHWC input, graph expects 3 channels"),
    "layout": (lambda c: _lie(c, layout="NCHW"), "card says 3-channel NCHW input, graph expects 32 channels"),
    "label count": (_three_labels, "card lists 3 labels, graph outputs 4 values"),
    "output kind": (lambda c: {**c, "output_kind": "probabilities"}, "card says output_kind 'probabilities'"),
    "unknown label": (
        lambda c: {**c, "labels": [*c["labels"][:3], "astrocytoma"]},
        "labels ['astrocytoma'] do not map to the contract classes",
    ),
    "torch weights": (lambda c: {**c, "torch": {}}, "card names torch weights"),
    "format": (lambda c: {**c, "format": "torchscript"}, "only ONNX classifiers can be imported"),
}


@pytest.mark.parametrize("lie", list(LIES))
def test_a_lying_card_is_refused_by_name_and_nothing_is_stored(
    foreign_logits_onnx, foreign_card, stored_versions, scratch_model_name, tmp_path, lie
) -> None:
    mutate, message = LIES[lie]
    card_path = _write_card(tmp_path / "card.yaml", mutate(foreign_card))
    with pytest.raises(ModelCardError, match=re.escape(message)):
        import_classifier(foreign_logits_onnx, card_path, name=scratch_model_name)
    assert stored_versions() == []


def _graph_file(path: Path, nodes: list, inputs: list, outputs: list) -> Path:
    graph = helper.make_graph(nodes, "hospital", inputs, outputs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _value(name: str, shape: list, elem_type: int = TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem_type, shape)


GRAPHS = {
    "two inputs": (
        [helper.make_node("Add", ["x", "y"], ["z"])],
        [_value("x", ["n", 32, 32, 3]), _value("y", ["n", 32, 32, 3])],
        [_value("z", ["n", 32, 32, 3])],
        "the graph has 2 inputs",
    ),
    "integer input": (
        [
            helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["f"], ["z"], axes=[1, 2], keepdims=0),
        ],
        [_value("x", ["n", 32, 32, 3], TensorProto.UINT8)],
        [_value("z", ["n", 3])],
        r"graph input is tensor\(uint8\)",
    ),
    "rank 3 input": (
        [helper.make_node("ReduceMean", ["x"], ["z"], axes=[2], keepdims=0)],
        [_value("x", ["n", 32, 32])],
        [_value("z", ["n", 32])],
        r"rank-4 NHWC input, graph input has shape \[\?×32×32\]",
    ),
    "image output": (
        [helper.make_node("Identity", ["x"], ["z"])],
        [_value("x", ["n", 32, 32, 3])],
        [_value("z", ["n", 32, 32, 3])],
        "a classifier outputs",
    ),
    "dynamic output width": (  # one output per input channel, and the channel axis is dynamic
        [helper.make_node("ReduceMean", ["x"], ["z"], axes=[1, 2], keepdims=0)],
        [_value("x", ["n", 32, 32, "c"])],
        [_value("z", ["n", "c"])],
        r"the model returned shape \(2, 3\)",
    ),
    "fails on a batch of two": (  # 2 images x 3 channel means cannot be reshaped into rows of 4
        [
            helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2], keepdims=0),
            helper.make_node("Reshape", ["m", "rows_of_4"], ["z"]),
        ],
        [_value("x", ["n", 32, 32, 3])],
        [_value("z", ["n", 4])],
        r"inference on a card-prepared \(2, 32, 32, 3\) batch failed",
    ),
    "non-finite output": (
        [
            helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2], keepdims=0),
            helper.make_node("Log", ["m"], ["l"]),
            helper.make_node("Concat", ["l", "l"], ["c"], axis=1),
            helper.make_node("Slice", ["c", "start", "end", "axis"], ["z"]),
        ],
        [_value("x", ["n", 32, 32, 3])],
        [_value("z", ["n", 4])],
        "non-finite outputs",
    ),
}


CONSTANTS = {
    "fails on a batch of two": [helper.make_tensor("rows_of_4", TensorProto.INT64, [2], [-1, 4])],
    # blank input scaled by the card's mean/std is negative: log() of it is NaN
    "non-finite output": [
        helper.make_tensor(name, TensorProto.INT64, [1], [value])
        for name, value in (("start", 0), ("end", 4), ("axis", 1))
    ],
}


@pytest.mark.parametrize("kind", list(GRAPHS))
def test_graphs_that_do_not_fit_a_classifier_card_are_refused(
    foreign_card, stored_versions, scratch_model_name, tmp_path, kind
) -> None:
    nodes, inputs, outputs, message = GRAPHS[kind]
    path = _graph_file(tmp_path / "m.onnx", nodes, inputs, outputs)
    model = onnx.load(str(path))
    model.graph.initializer.extend(CONSTANTS.get(kind, []))
    onnx.save(model, str(path))
    with pytest.raises(ModelCardError, match=message):
        import_classifier(path, ClassificationCard.model_validate(foreign_card), name=scratch_model_name)
    assert stored_versions() == []


def test_a_file_that_is_not_onnx_is_refused(foreign_card, scratch_model_name, stored_versions, tmp_path) -> None:
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(ModelCardError, match="not a loadable ONNX model"):
        import_classifier(path, ClassificationCard.model_validate(foreign_card), name=scratch_model_name)
    with pytest.raises(ModelCardError, match="does not exist"):
        import_classifier(tmp_path / "missing.onnx", ClassificationCard.model_validate(foreign_card))
    assert stored_versions() == []


@pytest.mark.parametrize(
    ("file_name", "content", "message"),
    [
        ("card.txt", "labels: []", "must be .json, .yaml or .yml"),
        ("card.json", "{not json", "invalid model card card.json"),
        ("card.yaml", "labels: [a", "invalid model card card.yaml"),
        ("card.yaml", "name: x", "intended_use: Field required"),
    ],
)
def test_unreadable_cards_are_refused(foreign_logits_onnx, tmp_path, file_name, content, message) -> None:
    card_path = tmp_path / file_name
    card_path.write_text(content, encoding="utf-8")
    with pytest.raises(ModelCardError, match=message):
        import_classifier(foreign_logits_onnx, card_path)


@pytest.fixture()
def validation_dir(tmp_path) -> Path:
    """Two CT DICOM slices per class folder, one folder named by a model label, one by a contract class."""
    images, _, _ = generate_ct_dataset(1, seed=2, size=64)
    for folder, hu_images in (("glioma", images[:2]), ("Meningioma", images[2:])):
        (tmp_path / "val" / folder).mkdir(parents=True)
        for i, hu in enumerate(hu_images):
            write_ct_dicom(hu, tmp_path / "val" / folder / f"{i}.dcm")
    return tmp_path / "val"


def test_validation_folder_measures_the_model(
    foreign_logits_onnx, foreign_card, scratch_model_name, validation_dir
) -> None:
    card = ClassificationCard.model_validate(foreign_card)
    tag = import_classifier(foreign_logits_onnx, card, name=scratch_model_name, validation_dir=validation_dir)
    metrics = store.read_card(store.get_model(tag), ClassificationCard).metrics
    classes = ["no_tumor", "glioma", "meningioma", "pituitary"]
    confusion = np.array([[metrics[f"validation_confusion_{t}_as_{p}"] for p in classes] for t in classes])
    assert metrics["accuracy"] == 0.91  # the hospital's own claim is kept
    assert metrics["validation_n"] == 4 and confusion.sum() == 4
    assert confusion.sum(axis=1).tolist() == [0, 2, 2, 0]
    assert metrics["validation_accuracy"] == pytest.approx(np.trace(confusion) / 4)
    assert metrics["validation_recall_glioma"] == pytest.approx(confusion[1, 1] / 2)
    assert "validation_recall_pituitary" not in metrics and "validation_macro_f1" in metrics


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "astrocytoma").mkdir(), "validation folder 'astrocytoma' is neither"),
        (lambda d: (d / "glioma" / "2.dcm").write_bytes(b"garbage"), r"validation image #3 in 'glioma'"),
    ],
)
def test_a_bad_validation_folder_refuses_the_import(
    foreign_logits_onnx, foreign_card, scratch_model_name, stored_versions, validation_dir, damage, message
) -> None:
    damage(validation_dir)
    with pytest.raises(ModelCardError, match=message):
        import_classifier(
            foreign_logits_onnx, ClassificationCard.model_validate(foreign_card), scratch_model_name, validation_dir
        )
    assert stored_versions() == []


def test_an_empty_validation_folder_refuses_the_import(foreign_logits_onnx, foreign_card, tmp_path) -> None:
    with pytest.raises(ModelCardError, match="holds no images"):
        import_classifier(foreign_logits_onnx, ClassificationCard.model_validate(foreign_card), validation_dir=tmp_path)
