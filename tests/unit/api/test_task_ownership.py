"""A task belongs to the subject who submitted it: its submitter is recorded before the submission is answered, and
every route that takes a task id (ours and BentoML's) answers another subject as it answers an unknown id. Both task
stores: SQLite (one machine) and a real PostgreSQL (replicas; tests/postgres.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from api import tasks as api_tasks
from core.settings import Settings
from state.tasks import visible_to

ROUTE = "/predict/mri_segmentation"


@pytest.fixture(params=["embedded", "distributed"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    if request.param == "embedded":
        return Settings(data_dir=str(tmp_path / "data"))
    url = request.getfixturevalue("postgres_server").new_database()
    return Settings(data_dir=str(tmp_path / "data"), distributed={"database_url": url,
                                                                  "shared_dir": str(tmp_path / "volume")})


def call(middleware: api_tasks.TaskRoutesMiddleware, subject: str, method: str, path: str,
         query: bytes = b"") -> tuple[int, dict | None, bool]:
    """One request as `subject`: (status, JSON body, whether BentoML's own app was reached)."""
    reached, sent = [], []

    async def bentoml(scope, receive, send):  # BentoML's routes: a submission answers a task id
        reached.append(scope["path"])
        answer = {"task_id": "t1", "status": "in_progress"} if scope["path"].endswith("/submit") else {}
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})

    async def send(message):
        sent.append(message)

    middleware.app = bentoml
    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": query}
    original = api_tasks.current_owner
    api_tasks.current_owner = lambda: subject
    try:
        asyncio.run(middleware(scope, None, send))
    finally:
        api_tasks.current_owner = original
    return sent[0]["status"], json.loads(sent[1]["body"]), bool(reached)


def test_only_the_submitter_sees_its_task_everywhere(settings: Settings) -> None:
    middleware = api_tasks.TaskRoutesMiddleware(None, task_routes=(ROUTE,), settings=settings)
    store = middleware.tasks
    status, answer, _ = call(middleware, "alice", "POST", f"{ROUTE}/submit")
    assert status == 200 and answer["task_id"] == "t1"
    assert store.owner("t1") == "alice"  # recorded before the answer left
    store.create("t1", None, "mri_segmentation")
    before = store.get("t1").status
    unknown = json.loads(api_tasks.task_status(store, "never-submitted", "bob").body)

    for route in ("status", "get", "retry"):
        status, answer, reached = call(middleware, "bob", "GET", f"{ROUTE}/{route}", b"task_id=t1")
        assert (status, reached) == (404, False) and answer["error"]["code"] == "NOT_FOUND"
    status, answer, reached = call(middleware, "bob", "PUT", f"{ROUTE}/cancel", b"task_id=t1")
    assert status == 404 and not reached
    answers = [json.loads(api_tasks.task_status(store, "t1", "bob").body),
               json.loads(api_tasks.cancel_task(store, "t1", "bob").body)]
    for answer in answers:  # the same as for an id nobody submitted, but for the id itself
        assert {**answer["error"], "timestamp": None, "details": None} == \
            {**unknown["error"], "timestamp": None, "details": None}
    assert store.get("t1").status == before  # bob's cancel changed nothing

    assert json.loads(api_tasks.task_status(store, "t1", "alice").body)["status"] == before
    if settings.distributed.enabled:  # BentoML's status in the replicas' shape, from the shared store
        assert call(middleware, "alice", "GET", f"{ROUTE}/status", b"task_id=t1")[0] == 200
    else:  # BentoML's own handler answers the submitter
        assert call(middleware, "alice", "GET", f"{ROUTE}/status", b"task_id=t1")[2] is True
    if before == "pending":  # (distributed, the fake BentoML queued nothing: the submission failed it)
        status, answer, _ = call(middleware, "alice", "PUT", f"{ROUTE}/cancel", b"task_id=t1")
        assert status == 200 and answer["status"] == "cancelled"


def test_the_first_submitter_stands_and_unowned_tasks_stay_readable(settings: Settings) -> None:
    store = api_tasks.TaskRoutesMiddleware(None, task_routes=(ROUTE,), settings=settings).tasks
    store.set_owner("t2", "alice")
    store.set_owner("t2", "mallory")
    assert store.owner("t2") == "alice" and not visible_to(store, "t2@3", "mallory")  # an attempt's ref too
    assert store.owner("pacs-job") is None and visible_to(store, "pacs-job", "anyone")


def test_without_auth_no_submitter_is_recorded(settings: Settings) -> None:
    middleware = api_tasks.TaskRoutesMiddleware(None, task_routes=(ROUTE,), settings=settings)
    call(middleware, "", "POST", ROUTE)
    assert middleware.tasks.owner("t1") is None
