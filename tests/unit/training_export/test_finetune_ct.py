"""Human in the loop: reviewed CT feedback becomes a fine-tuning run that registers a new version only if not worse."""

from __future__ import annotations

import json

import bentoml
import numpy as np
import pytest

from state.feedback import FeedbackStore
from core import store
from core.cards import ClassificationCard
from training_export.finetune_ct import (
    FineTuneConfig,
    finetune_from_feedback,
    split_feedback,
)
from training_export.synthetic_ct import generate_ct_dataset, write_ct_dicom

PARENT = "test-finetune-ct"


@pytest.fixture(scope="module")
def parent_tag(ct_model: str) -> str:
    """A copy of the demo CT model under its own name, so registered children never become `neuronova-ct:latest`."""
    demo = store.get_model("neuronova-ct:latest")
    card = store.read_card(demo, ClassificationCard)
    tag = store.save_model(PARENT, card, files={name: demo.path_of(name) for name in (card.model_file, "model.pt")})
    yield tag
    for model in store.list_versions(PARENT):
        bentoml.models.delete(model.tag)


@pytest.fixture(scope="module")
def reviewed_feedback(inprocess_client, tmp_path_factory) -> list[tuple[np.ndarray, str]]:
    """Sixteen synthetic CT DICOMs classified by the in-process service, each reviewed with its true label."""
    folder = tmp_path_factory.mktemp("finetune")
    hu_images, _, labels = generate_ct_dataset(4, (7, 3))
    class_names = ["Glioma", "Meningioma", "Pituitary", "No Tumor"]
    for index, (hu, label) in enumerate(zip(hu_images, labels)):
        path = folder / f"slice{index}.dcm"
        write_ct_dicom(hu, path)
        request_id = f"req-finetune-{index}"
        response = inprocess_client.post("/predict/ct_classification", files={"image": ("ct.dcm", path.read_bytes())},
                                         data={"patient_id": "P000001", "request_id": request_id})
        assert response.status_code == 200, response.text
        predicted, truth = response.json()["result"]["predicted_class"], class_names[label]
        review = {"verdict": "accept"} if predicted == truth else {"verdict": "correct", "corrected_label": truth}
        posted = inprocess_client.post("/feedback", json={"request_id": request_id, "reviewer_id": "dr_ft", **review})
        assert posted.status_code == 200, posted.text
    feedback_store: FeedbackStore = bentoml.get_current_service().feedback_store
    examples = feedback_store.labelled_inputs("ct_classification")
    mine = examples[-len(labels):]
    assert [label for _, label in mine] == [class_names[label] for label in labels]
    return mine


def test_reviewed_feedback_registers_a_child_that_is_not_worse(parent_tag, reviewed_feedback):
    report = finetune_from_feedback(reviewed_feedback, parent_tag, config=FineTuneConfig(min_records=4))
    assert report.registered, report.reasons
    assert report.n_train + report.n_holdout == len(reviewed_feedback) and report.n_holdout >= 1
    for name in ("reference", "feedback_holdout"):
        assert report.evaluation[f"{name}/candidate"]["accuracy"] >= report.evaluation[f"{name}/parent"]["accuracy"] - 0.01
    assert report.evaluation["reference/parent"]["n"] == 200  # the demo model's own synthetic held-out set

    child = store.read_card(store.get_model(report.tag), ClassificationCard)
    assert child.lineage.parent_tag == parent_tag and child.lineage.evaluation == report.evaluation
    assert child.lineage.non_inferiority_margin == 0.01
    assert child.metrics["onnx_max_abs_diff"] < 1e-4
    assert child.intended_use == "demo, not for clinical use" and "Fine-tuned on" in child.provenance.data_description
    assert store.get_model(f"{PARENT}:latest").tag == store.get_model(report.tag).tag


def test_a_candidate_worse_than_its_parent_is_refused_and_nothing_is_stored(parent_tag, reviewed_feedback):
    mislabelled = [(tensor, "No Tumor") for tensor, _ in reviewed_feedback]
    versions = len(store.list_versions(PARENT))
    report = finetune_from_feedback(mislabelled, parent_tag,
                                    config=FineTuneConfig(min_records=4, learning_rate=1e-2, epochs=8))
    assert not report.registered and report.tag is None
    assert any(reason.startswith("accuracy on reference fell") for reason in report.reasons)
    assert len(store.list_versions(PARENT)) == versions


def test_too_little_feedback_is_refused_with_the_counts(parent_tag, reviewed_feedback):
    report = finetune_from_feedback(reviewed_feedback[:3], parent_tag)
    assert not report.registered and "need at least 8" in report.reasons[0]


def test_inputs_of_another_shape_or_label_are_not_used(parent_tag, reviewed_feedback):
    foreign = [(np.zeros((1, 64, 64), np.float32), "Glioma"), (reviewed_feedback[0][0], "Astrocytoma")]
    report = finetune_from_feedback(foreign, parent_tag)
    assert report.n_train + report.n_holdout == 0 and not report.registered


def test_a_model_without_torch_weights_is_refused(parent_tag, reviewed_feedback):
    parent = store.get_model(parent_tag)
    card = store.read_card(parent, ClassificationCard).model_copy(update={"torch": None})
    onnx_only = store.save_model(PARENT, card, files={card.model_file: parent.path_of(card.model_file)})
    try:
        report = finetune_from_feedback(reviewed_feedback, onnx_only)
        assert not report.registered and "no torch weights" in report.reasons[0]
    finally:
        bentoml.models.delete(onnx_only)


def test_split_is_deterministic_and_keeps_the_latest_label_of_a_repeated_input():
    tensors = [np.full((1, 4, 4), i, np.float32) for i in range(40)]
    examples = [(t, "Glioma") for t in tensors] + [(tensors[0], "Meningioma")]
    train, holdout = split_feedback(examples, 0.25)
    assert len(train) + len(holdout) == 40 and 4 <= len(holdout) <= 18
    again, _ = split_feedback(examples, 0.25)
    assert [tensor.tobytes() for tensor, _ in again] == [tensor.tobytes() for tensor, _ in train]
    assert [label for tensor, label in train + holdout if np.array_equal(tensor, tensors[0])] == ["Meningioma"]


def test_cli_reads_the_configured_feedback_store_and_reports_json(parent_tag, reviewed_feedback, capsys):
    from training_export.__main__ import EXIT_REFUSED, main

    assert main(["finetune-ct", "--model", parent_tag, "--min-records", "1000"]) == EXIT_REFUSED
    report = json.loads(capsys.readouterr().out)
    assert report["registered"] is False and report["n_train"] >= 8 and "need at least 1000" in report["reasons"][0]
