"""`/feedback` through the in-process service into a real PostgreSQL chosen by NEURONOVA_FEEDBACK__DATABASE_URL."""

from __future__ import annotations

import io

import bentoml
import numpy as np
from PIL import Image

from core.feedback import FeedbackStore
from core.settings import Settings


def test_feedback_posted_to_the_service_lands_in_postgres(inprocess_client, postgres_server, monkeypatch, tmp_path):
    url = postgres_server.new_database()
    monkeypatch.setenv("NEURONOVA_FEEDBACK__DATABASE_URL", url)
    # The session's service read its settings at import and built its store at start-up: give the running instance
    # the store that these settings choose, exactly as `NeuroNova.__init__` builds it in a freshly started worker.
    service = bentoml.get_current_service()
    monkeypatch.setattr(service, "feedback_store", FeedbackStore(tmp_path / "feedback", Settings().feedback.database_url))

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

    [(tensor, label)] = FeedbackStore(tmp_path / "elsewhere", url).labelled_inputs("ct_classification")
    assert label == other and tensor.ndim == 3 and tensor.std() > 0  # the prepared pixels, read back from PostgreSQL
    assert not (tmp_path / "feedback").exists()  # nothing on this host's disk
