"""`/feedback` through the in-process service into a real PostgreSQL: the service builds its store itself
(`FeedbackStore.from_settings`) from NEURONOVA_FEEDBACK__DATABASE_URL, set before it started (tests/conftest.py)."""

from __future__ import annotations

import io
import os

import bentoml
import numpy as np
from PIL import Image
from sqlalchemy import select

from state.feedback import FeedbackStore
from state.feedback_db import feedback_records


def test_feedback_posted_to_the_service_lands_in_postgres(inprocess_client, postgres_server, tmp_path):
    url = os.environ["NEURONOVA_FEEDBACK__DATABASE_URL"]
    assert url.startswith(postgres_server.url(""))
    served_store = bentoml.get_current_service().feedback_store
    assert served_store.engine.dialect.name == "postgresql" and served_store.engine.url.database == url.rsplit("/", 1)[1]

    image = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64), dtype=np.uint8)).save(image, format="PNG")
    prediction = inprocess_client.post("/predict/ct_classification", files={"image": ("ct.png", image.getvalue())},
                                       data={"patient_id": "P1", "request_id": "req-feedback-pg"})
    assert prediction.status_code == 200, prediction.text
    predicted = prediction.json()
    other = next(label for label in predicted["result"]["probabilities"] if label != predicted["result"]["predicted_class"])
    response = inprocess_client.post("/feedback", json={"request_id": "req-feedback-pg", "verdict": "correct",
                                                         "corrected_label": other, "reviewer_id": "dr_pg"})
    assert response.status_code == 200, response.text
    receipt = response.json()
    assert receipt["model_version"] == predicted["model_version"]
    assert receipt["input_sha256"] == predicted["metadata"]["input"]["sha256"]

    elsewhere = FeedbackStore(tmp_path / "elsewhere", url)  # another host: nothing but the URL
    with elsewhere.engine.connect() as connection:
        [row] = connection.execute(select(feedback_records).where(feedback_records.c.request_id == "req-feedback-pg"))
    assert (row.id, row.corrected_label, row.reviewer_id) == (receipt["feedback_id"], other, "tests")  # the token's sub
    tensor, label = elsewhere.labelled_inputs("ct_classification")[-1]  # ordered by id: the newest is this one
    assert label == other and tensor.ndim == 3 and tensor.std() > 0  # the prepared pixels, read back from PostgreSQL
    assert not (tmp_path / "elsewhere").exists()  # nothing on this host's disk
