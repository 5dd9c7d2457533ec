"""BentoML's task routes answered from the shared PostgreSQL store (distributed mode), in BentoML's shapes, and the
submission registered there before its answer leaves (tests/replicas.py runs them across two real replicas)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from api import tasks as api_tasks
from core.errors import error_body
from state.pg_tasks import PostgresTaskStore
from core.settings import Settings
from state.tasks import task_ref

ROUTE = "/predict/mri_segmentation"


@pytest.fixture
def settings(postgres_server, tmp_path) -> Settings:
    return Settings(data_dir=str(tmp_path / "data"), distributed={"database_url": postgres_server.new_database(),
                                                                  "shared_dir": str(tmp_path / "volume")})


def body(response) -> tuple[int, dict]:
    return response.status_code, json.loads(response.body)


def test_status_and_result_in_bentomls_shapes(settings: Settings) -> None:
    store = PostgresTaskStore.from_settings(settings)
    assert body(api_tasks.bentoml_status(store, "nope", ""))[0] == 404
    assert body(api_tasks.bentoml_result(store, "nope", ""))[1]["error"]["code"] == "NOT_FOUND"
    store.create("t1", "r1", "mri_segmentation")
    assert body(api_tasks.bentoml_status(store, "t1", ""))[1]["status"] == "in_progress"  # queued: clients poll on
    status, answer = body(api_tasks.bentoml_result(store, "t1", ""))
    assert status == 400 and answer["error"]["details"] == {"status": "pending"}
    store.set_params("t1", {})
    ref = task_ref("t1", store.begin_attempt("t1", "a"))
    store.complete(ref, {"task_id": "t1", "result": {"tumor_detected": True}})
    status, answer = body(api_tasks.bentoml_status(store, "t1", ""))
    assert answer["status"] == "completed" and answer["executed_at"] is not None
    assert body(api_tasks.bentoml_result(store, "t1", "")) == (200, {"task_id": "t1", "result": {"tumor_detected": True}})
    for task_id, error, expected in (("t2", error_body("IMAGE_TOO_LARGE", "big"), 413),
                                     ("t3", error_body("SOMETHING_NEW", "?"), 500)):
        store.create(task_id, None, None)
        store.fail(task_id, error)
        assert body(api_tasks.bentoml_status(store, task_id, ""))[1]["status"] == "failed"
        status, answer = body(api_tasks.bentoml_result(store, task_id, ""))
        assert status == expected and answer["error"]["code"] == error["error"]["code"]
    store.create("t4", None, None)
    store.cancel("t4")
    assert body(api_tasks.bentoml_status(store, "t4", ""))[1]["status"] == "canceled"
    assert body(api_tasks.bentoml_result(store, "t4", ""))[0] == 409


def run_middleware(settings: Settings, path: str, method: str, answer: dict | None, query: bytes = b"") -> list[dict]:
    """One request through the middleware in front of a fake BentoML app that answers `answer` (and queues nothing)."""
    middleware = api_tasks.TaskRoutesMiddleware(None, task_routes=(ROUTE,), settings=settings)

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})

    middleware.app = app
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": query}
    asyncio.run(middleware(scope, None, send))
    return sent


def test_a_submission_is_registered_before_its_answer_and_failed_if_never_queued(settings: Settings, monkeypatch) -> None:
    store = PostgresTaskStore.from_settings(settings)
    monkeypatch.setattr(api_tasks, "_bentoml_task", lambda task_id: {"error": error_body("INVALID_REQUEST", "bad")["error"]})
    sent = run_middleware(settings, ROUTE, "POST", {"task_id": "t9", "status": "in_progress"})
    assert sent[0]["status"] == 202 and json.loads(sent[1]["body"])["task_id"] == "t9"
    record = store.get("t9")  # BentoML refused it after answering (validation): failed with BentoML's error
    assert record.status == "failed" and record.error["code"] == "INVALID_REQUEST"
    assert run_middleware(settings, f"{ROUTE}/submit", "POST", {"error": "x"})[0]["status"] == 200  # no task id


def test_status_get_and_cancel_routes_read_the_shared_store(settings: Settings) -> None:
    store = PostgresTaskStore.from_settings(settings)
    store.create("t5", None, None)
    sent = run_middleware(settings, f"{ROUTE}/status", "GET", None, b"task_id=t5")
    assert json.loads(sent[1]["body"])["status"] == "in_progress"
    sent = run_middleware(settings, f"{ROUTE}/cancel", "PUT", None, b"task_id=t5")
    assert json.loads(sent[1]["body"])["status"] == "cancelled" and store.get("t5").cancel_requested
    assert run_middleware(settings, f"{ROUTE}/get", "GET", None, b"task_id=t5")[0]["status"] == 409
    assert run_middleware(settings, f"{ROUTE}/get", "GET", None)[0]["status"] == 400  # no task_id


def test_every_task_route_answers_503_at_once_while_the_database_is_down(settings: Settings, monkeypatch) -> None:
    store = PostgresTaskStore.from_settings(settings)
    store.create("t5", None, None)

    def still_down() -> None:
        raise ConnectionRefusedError("the database is down")

    monkeypatch.setattr(api_tasks, "open_task_store", lambda _: store)  # a store opened at start, before the outage
    monkeypatch.setattr(store.database, "probe", still_down)  # one breaker per database in the process
    store.database.tripped(ConnectionRefusedError("the database is down"))
    for path, method, query in [(ROUTE, "POST", b""), (f"{ROUTE}/submit", "POST", b""),
                                (f"{ROUTE}/status", "GET", b"task_id=t5"), (f"{ROUTE}/get", "GET", b"task_id=t5"),
                                (f"{ROUTE}/cancel", "PUT", b"task_id=t5"), (f"{ROUTE}/retry", "POST", b"task_id=t5")]:
        sent = run_middleware(settings, path, method, {"task_id": "never-submitted", "status": "in_progress"}, query)
        assert sent[0]["status"] == 503, (path, sent)
        assert dict(sent[0]["headers"])[b"retry-after"] == b"5"
        answer = json.loads(sent[1]["body"])
        assert answer["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert answer["error"]["details"]["reason"] == "database_unreachable"
    monkeypatch.undo()  # the database answers the breaker's probe again
    deadline = time.monotonic() + 30.0
    while not store.database.available:
        assert time.monotonic() < deadline, "the breaker did not close once the database answered"
        time.sleep(0.01)
    assert store.get("t5").status == "pending"  # the cancel did not go through
    assert store.get("never-submitted") is None  # no submission reached BentoML
