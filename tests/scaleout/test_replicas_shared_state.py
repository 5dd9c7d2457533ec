"""Shared state across two replicas (issue #14, tests 4-6): a model switch or upload through replica A reaches B's
/health and answers within 10 s with no 5xx under load, and rolls back the same way; one rate limit across both;
/xai/explain and /feedback on whichever replica answered the prediction."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import httpx
import psycopg
import pytest
from pydicom.data import get_testdata_file

from bench.harness import ROOT
from core import store
from core.cards.classification import ClassificationCard
from tests.http.conftest import make_token
from tests.replicas import RATE_LIMITED_ROUTE, RATE_LIMITED_PER_MINUTE, Replica, ReplicaSet

pytestmark = pytest.mark.replicas

CT_SMALL = Path(get_testdata_file("CT_small.dcm")).read_bytes()
PROPAGATION_LIMIT_S = 10.0
LOAD_CLIENTS = 2


def classify(client: httpx.Client, **form: str) -> httpx.Response:
    return client.post("/predict/ct_classification", files={"image": ("ct.dcm", CT_SMALL)},
                       data={"patient_id": "P000001", **form})


def ct_health(replica: Replica, replicas: ReplicaSet) -> dict:
    with replicas.client(replica, timeout=10) as client:
        return client.get("/health").json()


def served_ct(replica: Replica, replicas: ReplicaSet) -> str | None:
    return ct_health(replica, replicas)["models"]["ct_classification"].get("version")


def new_ct_version(served: str, name: str) -> str:
    """Another version of the served CT model in this process's store (same weights, a new card name)."""
    model = store.get_model(served)
    card = store.read_card(model, ClassificationCard).model_copy(update={"name": name})
    files = {file: Path(model.path_of(file)) for file in (card.model_file, card.torch.weights_file)}
    return store.save_model("neuronova-ct", card, files)


def import_into(replica: Replica, export: Path) -> None:
    """`bentoml models import` into a replica's own model store (as a model baked into its image)."""
    subprocess.run([str(ROOT / ".venv" / "bin" / "bentoml"), "models", "import", str(export.resolve())],
                   env={**os.environ, "BENTOML_HOME": str(replica.home)}, check=True, capture_output=True, timeout=120)


class Load:
    """Clients classifying through the balancer without pause; every status and answering replica kept."""

    def __init__(self, replicas: ReplicaSet) -> None:
        self.replicas = replicas
        self.answers: list[tuple[int, str]] = []
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(LOAD_CLIENTS)

    def _loop(self) -> None:
        with self.replicas.client() as client:
            while not self.stop.is_set():
                response = classify(client)
                self.answers.append((response.status_code, response.headers.get("x-replica", "")))

    def __enter__(self) -> Load:
        self.loops = [self.pool.submit(self._loop) for _ in range(LOAD_CLIENTS)]
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for loop in self.loops:
            loop.result()
        self.pool.shutdown()


def switch_and_time(replicas: ReplicaSet, via: Replica, expected: str, **form) -> dict[str, float]:
    """POST /update_model to `via`; the seconds until it answered and until the other replica's /health names
    `expected` (then the other replica's answers carry it too)."""
    other = replicas.other(via)
    started = time.monotonic()
    with httpx.Client(base_url=via.url, headers=replicas.admin_headers, timeout=180) as admin:
        if "files" in form:
            answer = admin.post("/update_model", files=form.pop("files"), data=form)
        else:
            answer = admin.post("/update_model", json=form)
    answered = time.monotonic()
    assert answer.status_code == 200 and answer.json()["success"], answer.text
    assert answer.json()["new_version"] == expected
    assert sorted((r["replica"], r["version"], r["switched"]) for r in answer.json()["replicas"]) == [
        ("a", expected, True), ("b", expected, True)], answer.text  # the answer waited for both
    while served_ct(other, replicas) != expected:
        assert time.monotonic() - started < PROPAGATION_LIMIT_S, f"{other.name} did not serve {expected} in time"
        time.sleep(0.1)
    seen = time.monotonic()
    with replicas.client(other) as client:
        assert classify(client).json()["model_version"] == expected  # the answers too, not only /health
    timing = {"answered_s": round(answered - started, 2), "seen_on_other_s": round(seen - started, 2),
              "other_after_answer_s": round(seen - answered, 2)}
    print(f"\nswitch to {expected} via {via.name}: {timing}")
    return timing


@pytest.fixture
def ct_versions(replicas: ReplicaSet) -> Iterator[tuple[str, str, str, Path]]:
    """The served CT tag; a second version in both replicas' stores; a third only as an export file (an upload).
    Afterwards both replicas serve the original again, and this process's store is as before."""
    a, b = replicas.replicas
    served = served_ct(a, replicas)
    assert served and served == served_ct(b, replicas)
    folder = replicas.shared_dir.parent / f"exports-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    stored, uploaded = new_ct_version(served, "CT demo, stored"), new_ct_version(served, "CT demo, uploaded")
    stored_export, upload = folder / "stored.bentomodel", folder / "uploaded.bentomodel"
    bentoml.models.export_model(stored, str(stored_export))
    bentoml.models.export_model(uploaded, str(upload))
    for replica in (a, b):
        import_into(replica, stored_export)
    try:
        yield served, stored, uploaded, upload
    finally:
        for tag in (stored, uploaded):
            store.delete_model(tag)
        if served_ct(a, replicas) != served:
            with httpx.Client(base_url=a.url, headers=replicas.admin_headers, timeout=180) as admin:
                admin.post("/update_model", json={"model_id": "ct_classification", "version": served})


def test_switch_upload_and_rollback_reach_the_other_replica_under_load(replicas: ReplicaSet, ct_versions) -> None:
    served, stored, uploaded, upload = ct_versions
    a, b = replicas.replicas
    digest = hashlib.sha256(upload.read_bytes()).hexdigest()
    with Load(replicas) as load:
        timings = [switch_and_time(replicas, a, stored, model_id="ct_classification", version=stored),
                   switch_and_time(replicas, a, served, model_id="ct_classification", rollback=True),
                   switch_and_time(replicas, a, uploaded, model_id="ct_classification", sha256=digest,
                                   files={"model_file": ("model.bentomodel", upload.read_bytes())}),
                   switch_and_time(replicas, b, served, model_id="ct_classification", rollback=True)]
    statuses = [status for status, _ in load.answers]
    assert statuses and all(status == 200 for status in statuses), sorted(set(statuses))
    assert {name for _, name in load.answers} == {"a", "b"}
    assert (replicas.shared_dir / "models" / f"{digest}.bentomodel").exists()  # written once for every replica
    print(f"\npropagation (s, from the request to the other replica's /health): "
          f"{[t['seen_on_other_s'] for t in timings]}; "
          f"{len(statuses)} requests under load, all 200")


def test_a_replica_that_cannot_load_a_switch_is_reported_and_takes_it_once_it_can(
        replicas: ReplicaSet, ct_versions, tmp_path: Path) -> None:
    """A version in A's store only (not uploaded, so not on the shared volume): the switch through A answers that A
    switched and B did not (pending, with B's load error); B keeps serving the old version, degraded; once the
    version is in B's store too, B's retry takes it without an operator."""
    served = ct_versions[0]
    a, b = replicas.replicas
    only_a = new_ct_version(served, "CT demo, on a only")
    export = tmp_path / "only-a.bentomodel"
    bentoml.models.export_model(only_a, str(export))
    import_into(a, export)
    try:
        with httpx.Client(base_url=a.url, headers=replicas.admin_headers, timeout=180) as admin:
            answer = admin.post("/update_model", json={"model_id": "ct_classification", "version": only_a})
        assert answer.status_code == 200 and answer.json()["success"], answer.text
        by_name = {r["replica"]: r for r in answer.json()["replicas"]}
        assert sorted(by_name) == ["a", "b"], answer.text
        assert (by_name["a"]["version"], by_name["a"]["switched"]) == (only_a, True)
        assert (by_name["b"]["version"], by_name["b"]["switched"], by_name["b"]["switch_pending"]) == (
            served, False, only_a)
        assert "not in the model store" in by_name["b"]["error"]
        health = ct_health(b, replicas)
        assert health["status"] == "degraded" and health["models"]["ct_classification"]["switch_pending"] == only_a

        import_into(b, export)  # the operator brings the version to B: its next retry (backoff) loads it
        deadline = time.monotonic() + 60
        while (health := ct_health(b, replicas))["models"]["ct_classification"]["version"] != only_a:
            assert time.monotonic() < deadline, f"b never took {only_a}: {health}"
            time.sleep(0.2)
        assert health["status"] == "healthy" and health["models"]["ct_classification"]["switch_pending"] is None
    finally:
        store.delete_model(only_a)


def test_one_rate_limit_across_both_replicas(replicas: ReplicaSet) -> None:
    """A client's requests alternate between the replicas (the balancer's round robin): together they get exactly
    the limit, then 429 with Retry-After, from either replica."""
    with psycopg.connect(replicas.database_url) as db:
        seconds_into_minute = db.execute("SELECT (extract(epoch FROM now()) % 60)::float8").fetchone()[0]
    if seconds_into_minute > 40:  # a fixed window: start the count in a fresh one
        time.sleep(61 - seconds_into_minute)
    token = make_token(subject=f"rate-{uuid.uuid4().hex[:8]}")
    with httpx.Client(base_url=replicas.balancer_url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        answers = [client.get(RATE_LIMITED_ROUTE) for _ in range(RATE_LIMITED_PER_MINUTE + 6)]
    statuses = [answer.status_code for answer in answers]
    assert statuses == [200] * RATE_LIMITED_PER_MINUTE + [429] * 6, statuses
    assert {a.headers["x-replica"] for a in answers[:RATE_LIMITED_PER_MINUTE]} == {"a", "b"}
    assert {a.headers["x-replica"] for a in answers[RATE_LIMITED_PER_MINUTE:]} == {"a", "b"}
    assert all(1 <= int(a.headers["retry-after"]) <= 60 for a in answers[RATE_LIMITED_PER_MINUTE:])


@pytest.mark.parametrize("predicted_on", ["a", "b"])
def test_explain_and_feedback_on_the_other_replica(replicas: ReplicaSet, predicted_on: str) -> None:
    request_id = f"req-{predicted_on}-{uuid.uuid4().hex[:8]}"
    with replicas.client(predicted_on) as client:
        predicted = classify(client, request_id=request_id)
    assert predicted.status_code == 200, predicted.text
    with replicas.client(replicas.other(predicted_on)) as client:
        explained = client.post("/xai/explain", json={"request_id": request_id})
        receipt = client.post("/feedback", json={"request_id": request_id, "verdict": "correct",
                                                 "corrected_label": "No Tumor", "reviewer_id": "dr_replica"})
    assert explained.status_code == 200, explained.text
    assert explained.json()["xai"]["grad_cam"]["target_class"] == predicted.json()["result"]["predicted_class"]
    assert receipt.status_code == 200, receipt.text
    assert receipt.json()["model_version"] == predicted.json()["model_version"]
    with psycopg.connect(replicas.database_url) as db:
        rows = db.execute("SELECT verdict, model_version FROM feedback WHERE request_id = %s", (request_id,)).fetchall()
    assert rows == [("correct", predicted.json()["model_version"])]
