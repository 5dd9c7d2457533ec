"""The durable feedback store, the same cases against embedded SQLite and a real PostgreSQL server."""

from __future__ import annotations

import base64
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from sqlalchemy import func, select, text

from pipelines.feedback import FeedbackRequest, record_feedback
from state.feedback import FeedbackStore, InputFiles
from state.request_cache import CachedRequest
from core.cards.segmentation import VolumeInputSpec
from core.errors import InvalidImageFormat, InvalidRequest
from state.feedback_db import feedback_inputs
from postprocessing.outputs import mask_nifti_gz
from preprocessing.volumes import prepare_labels, prepare_volume
from training_export.synthetic_mri import SyntheticCase, synthetic_case


def entry(request_id: str, value: float = 1.0, model_id: str = "ct_classification", shape=(1, 4, 4)) -> CachedRequest:
    return CachedRequest(
        request_id=request_id, model_id=model_id, model_version="neuronova-ct:v1", input_sha256="ab" * 32,
        arrays={"tensor": np.full(shape, value, np.float32), "display": np.zeros((8, 8), np.uint8)},
        facts={"labels": ["Glioma", "No Tumor"], "predicted_class": "Glioma"},
    )


MASK_LABELS = {"background": 0, "necrotic_core": 1, "oedema": 2, "enhancing_tumor": 4}


@pytest.fixture(scope="module")
def case() -> SyntheticCase:
    """A small case on a 3 mm grid, so the model grid (2 mm) differs from the input's."""
    return synthetic_case(7, (32, 32, 20), (3.0, 3.0, 3.0))


def segmentation(request_id: str, case: SyntheticCase) -> CachedRequest:
    """A cached MRI request as pipelines/mri.py `cached_segmentation` builds it (the truth standing in for the prediction)."""
    prepared = prepare_volume(case.volume, VolumeInputSpec(), 2**24)
    return CachedRequest(
        request_id=request_id, model_id="mri_segmentation", model_version="neuronova-mri:v1", input_sha256="ef" * 32,
        arrays={"tensor": prepared.tensor.astype(np.float16), "affine": prepared.affine, "mask": case.labels,
                "input_affine": case.volume.affine},
        facts={"mask_labels": MASK_LABELS},
    )


def nifti_b64(labels: np.ndarray, affine: np.ndarray) -> str:
    return base64.b64encode(mask_nifti_gz(labels, affine)).decode()


def correct_mask(request_id: str, mask: str) -> FeedbackRequest:
    return FeedbackRequest(request_id=request_id, verdict="correct", corrected_mask=mask, reviewer_id="dr_9")


def accept(request_id: str) -> FeedbackRequest:
    return FeedbackRequest(request_id=request_id, verdict="accept", reviewer_id="dr_7")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request) -> str | None:
    """None: the embedded default (SQLite in the store's directory); else a fresh database on the test server."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_server").new_database()


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "feedback"


def stored_inputs(store: FeedbackStore) -> int:
    if isinstance(store.inputs, InputFiles):
        return len(list(store.inputs.directory.glob("*.npz")))
    with store.engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(feedback_inputs)).scalar_one()


def test_verdicts_are_stored_and_build_a_fine_tuning_set(directory, database_url):
    store = FeedbackStore(directory, database_url)
    receipt = record_feedback(store, accept("r1"), entry("r1", 1.0))
    assert receipt.feedback_id == 1 and receipt.model_version == "neuronova-ct:v1" and receipt.input_sha256 == "ab" * 32
    second = record_feedback(store, FeedbackRequest(request_id="r2", verdict="correct", corrected_label="No Tumor",
                                          reviewer_id="dr_7", comment="artefact"), entry("r2", 2.0))
    assert second.feedback_id == 2 and second.verdict == "correct"
    record_feedback(store, FeedbackRequest(request_id="r3", verdict="reject", reviewer_id="dr_7"), entry("r3", 3.0))
    record_feedback(store, accept("b1"), entry("b1", 4.0, model_id="other_model"))
    labelled = FeedbackStore(directory, database_url).labelled_inputs("ct_classification")  # a new store: durable
    assert [label for _, label in labelled] == ["Glioma", "No Tumor"]
    assert np.array_equal(labelled[1][0], np.full((1, 4, 4), 2.0, np.float32))
    assert FeedbackStore(directory, database_url).labelled_inputs("never_reviewed") == []


def test_an_input_is_stored_once_per_distinct_tensor(directory, database_url):
    store = FeedbackStore(directory, database_url)
    record_feedback(store, accept("r1"), entry("r1", 5.0))
    record_feedback(store, accept("r2"), entry("r2", 5.0))  # the same tensor reviewed twice
    assert stored_inputs(store) == 1
    # The same upload (same input_sha256) prepared differently by another model version keeps its own tensor.
    record_feedback(store, accept("r3"), entry("r3", 5.0, shape=(1, 8, 8)))
    assert stored_inputs(store) == 2
    assert [tensor.shape for tensor, _ in store.labelled_inputs("ct_classification")] == [(1, 4, 4)] * 2 + [(1, 8, 8)]


def test_a_refused_correction_stores_nothing(directory, database_url):
    store = FeedbackStore(directory, database_url)
    with pytest.raises(InvalidRequest, match="one of"):
        record_feedback(store, FeedbackRequest(request_id="r", verdict="correct", corrected_label="Astrocytoma",
                                     reviewer_id="dr"), entry("r"))
    assert store.labelled_inputs("ct_classification") == [] and stored_inputs(store) == 0


def test_two_workers_start_and_write_at_once(directory, database_url):
    """Two stores (as in the two API worker processes) created together on an empty database, then 2 x 20 writes."""
    with ThreadPoolExecutor(2) as pool:
        stores = list(pool.map(lambda _: FeedbackStore(directory, database_url), range(2)))
        jobs = [(stores[index % 2], f"r{index}", float(index)) for index in range(40)]
        receipts = list(pool.map(lambda job: record_feedback(job[0], accept(job[1]), entry(job[1], job[2])), jobs))
    assert sorted(receipt.feedback_id for receipt in receipts) == list(range(1, 41))
    tensors = stores[0].labelled_inputs("ct_classification")
    assert sorted(float(tensor.flat[0]) for tensor, _ in tensors) == [float(index) for index in range(40)]


def test_sqlite_runs_in_wal_mode(directory):
    with FeedbackStore(directory).engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"


def test_a_database_written_before_sqlalchemy_still_reads_and_appends(directory):
    """The data dir of an earlier release: the same table written by sqlite3, inputs named by the upload's hash."""
    (directory / "inputs").mkdir(parents=True)
    np.savez_compressed(directory / "inputs" / f"{'cd' * 32}.npz", tensor=np.ones((1, 4, 4), np.float32))
    with sqlite3.connect(directory / "feedback.sqlite3") as connection:
        connection.execute(
            "CREATE TABLE feedback (id INTEGER PRIMARY KEY AUTOINCREMENT, created_at TEXT NOT NULL, request_id TEXT NOT"
            " NULL, model_id TEXT NOT NULL, model_version TEXT NOT NULL, input_sha256 TEXT NOT NULL, predicted TEXT,"
            " verdict TEXT NOT NULL CHECK (verdict IN ('accept', 'correct', 'reject')), corrected_label TEXT,"
            " reviewer_id TEXT NOT NULL, comment TEXT NOT NULL DEFAULT '', input_file TEXT NOT NULL)")
        connection.execute(
            "INSERT INTO feedback (created_at, request_id, model_id, model_version, input_sha256, predicted, verdict,"
            " reviewer_id, input_file) VALUES ('2026-11-01T10:00:00+00:00', 'old', 'ct_classification', 'v0', ?,"
            " 'No Tumor', 'accept', 'dr_1', ?)", ("cd" * 32, f"{'cd' * 32}.npz"))
    connection.close()
    store = FeedbackStore(directory)
    assert record_feedback(store, accept("new"), entry("new", 2.0)).feedback_id == 2
    assert [label for _, label in store.labelled_inputs("ct_classification")] == ["No Tumor", "Glioma"]


def test_only_sqlite_and_postgresql_urls(directory):
    with pytest.raises(ValueError, match="must be one of"):
        FeedbackStore(directory, "mysql://reviewer@db.example/neuronova")


def test_segmentation_verdicts_keep_the_reviewed_mask_for_fine_tuning(directory, database_url, case):
    store = FeedbackStore(directory, database_url)
    cached = segmentation("m1", case)
    corrected = np.where(case.labels == 2, 0, case.labels).astype(np.uint8)  # the reviewer erases the oedema
    receipt = record_feedback(store, correct_mask("m1", nifti_b64(corrected, case.volume.affine)), cached)
    assert receipt.model_id == "mri_segmentation" and receipt.input_sha256 == "ef" * 32
    record_feedback(store, accept("m1"), cached)  # the model's own mask stands
    record_feedback(store, FeedbackRequest(request_id="m1", verdict="reject", reviewer_id="dr_9"), cached)  # no mask to learn
    volumes = list(FeedbackStore(directory, database_url).labelled_volumes("mri_segmentation"))
    assert len(volumes) == 2 and stored_inputs(store) == 3  # one input, two distinct masks
    spec = VolumeInputSpec()
    for volume, truth in zip(volumes, (corrected, case.labels)):
        assert volume.tensor.dtype == np.float32 and volume.tensor.shape[1:] == volume.labels.shape
        np.testing.assert_array_equal(volume.affine, cached.arrays["affine"])
        np.testing.assert_array_equal(volume.tensor, cached.arrays["tensor"].astype(np.float32))
        # exactly the label map the training pipeline prepares from a mask on the input's grid
        np.testing.assert_array_equal(volume.labels, prepare_labels(truth, case.volume.affine, spec))
    assert 2 in volumes[1].labels and 2 not in volumes[0].labels
    assert list(store.labelled_volumes("ct_classification")) == []


def test_a_refused_mask_or_label_stores_nothing(directory, case):
    store = FeedbackStore(directory)
    cached, affine = segmentation("m", case), case.volume.affine
    shifted = affine.copy()
    shifted[0, 3] += 1.5
    refusals = {
        "not valid base64": (InvalidRequest, "###"),
        "not a NIfTI": (InvalidImageFormat, base64.b64encode(b"a PNG, perhaps").decode()),
        "has shape \\[32, 32, 19\\]": (InvalidRequest, nifti_b64(case.labels[..., :19], affine)),
        "on the request's grid": (InvalidRequest, nifti_b64(np.zeros((40, 40, 20), np.uint8), affine)),
        "affine differs": (InvalidRequest, nifti_b64(case.labels, shifted)),
        "values \\[3\\]": (InvalidRequest, nifti_b64(np.where(case.labels == 4, 3, case.labels), affine)),
    }
    for message, (error, mask) in refusals.items():
        with pytest.raises(error, match=message):
            record_feedback(store, correct_mask("m", mask), cached)
    with pytest.raises(InvalidRequest, match="correct it with corrected_mask"):
        record_feedback(store, FeedbackRequest(request_id="m", verdict="correct", corrected_label="Glioma", reviewer_id="dr"), cached)
    with pytest.raises(InvalidRequest, match="corrected_mask is for segmentation requests"):
        record_feedback(store, correct_mask("r", nifti_b64(case.labels, affine)), entry("r"))
    assert list(store.labelled_volumes("mri_segmentation")) == [] and stored_inputs(store) == 0


def test_feedback_request_validation():
    with pytest.raises(ValidationError, match="corrected_label"):
        FeedbackRequest(request_id="r", verdict="correct", reviewer_id="dr")
    with pytest.raises(ValidationError, match="one of corrected_label"):
        FeedbackRequest(request_id="r", verdict="correct", corrected_label="Glioma", corrected_mask="AAAA", reviewer_id="d")
    with pytest.raises(ValidationError, match="corrected_mask goes with a 'correct' verdict only"):
        FeedbackRequest(request_id="r", verdict="accept", corrected_mask="AAAA", reviewer_id="dr")
    with pytest.raises(ValidationError):
        FeedbackRequest(request_id="r", verdict="maybe", reviewer_id="dr")
    with pytest.raises(ValidationError):
        FeedbackRequest(request_id="r", verdict="accept", reviewer_id="dr 7; DROP TABLE feedback")
