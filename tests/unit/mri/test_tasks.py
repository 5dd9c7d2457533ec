"""Our task store and task routes' helpers: lifecycle, progress, cancel flag, dead workers, BentoML fallback."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import subprocess
import sys
from types import SimpleNamespace

import pytest
from pydantic import BaseModel

from api import tasks as api_tasks
from core.errors import InvalidImageFormat
from pipelines.priority_gate import PriorityGate
from core.settings import Settings
from state.tasks import TaskCancelled, TaskStore, task_store_path


class Body(BaseModel):
    value: int


@pytest.fixture()
def store(tmp_path) -> TaskStore:
    return TaskStore(task_store_path(tmp_path))


def test_lifecycle_with_progress_and_result(store: TaskStore) -> None:
    store.create("t1", "req_1", "mri_segmentation")
    record = store.get("t1")
    assert record.status == "pending" and record.progress == 0 and record.current_step == "queued"
    store.report("t1", "preprocessing")
    store.report("t1", "inference", 50, eta_seconds=12.5)
    store.report("t1", "inference", 40)
    record = store.get("t1")
    assert (record.status, record.progress, record.current_step, record.estimated_remaining_seconds) == \
        ("processing", 50, "inference", None)
    store.complete("t1", {"ok": True})
    body = store.get("t1").to_json()
    assert body["status"] == "completed" and body["progress"] == 100 and body["result"] == {"ok": True}
    assert body["completed_at"] and body["failed_at"] is None and body["created_at"]
    assert store.get("missing") is None
    assert oct(task_store_path(store.path.parents[1]).parent.stat().st_mode & 0o777) == "0o700"


def test_failure_keeps_the_spec_error(store: TaskStore) -> None:
    store.create("t2", None, "mri_segmentation")
    store.fail("t2", InvalidImageFormat("bad file", {"format": "nifti"}))
    body = store.get("t2").to_json()
    assert body["status"] == "failed" and body["failed_at"]
    assert body["error"]["code"] == "INVALID_IMAGE_FORMAT" and body["error"]["details"] == {"format": "nifti"}


def test_cancel_stops_reporting_and_raises_at_the_next_check(store: TaskStore) -> None:
    store.create("t3", None, "mri_segmentation")
    store.report("t3", "inference", 30)
    record = store.cancel("t3")
    assert record.status == "cancelled" and record.cancel_requested and record.to_json()["cancelled_at"]
    with pytest.raises(TaskCancelled):
        store.report("t3", "inference", 60)
    store.complete("t3", {"late": True})
    assert store.get("t3").status == "cancelled" and store.get("t3").result is None
    assert store.cancel("unknown") is None


def test_a_task_whose_worker_died_is_reported_failed(store: TaskStore) -> None:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    store.create("t4", None, "mri_segmentation")
    with sqlite3.connect(store.path) as connection:
        connection.execute("UPDATE tasks SET owner_pid = ? WHERE task_id = 't4'", (int(child.stdout),))
    record = store.get("t4")
    assert record.status == "failed" and "stopped" in record.error["message"]


def test_run_tracked_outcomes(store: TaskStore) -> None:
    async def works() -> Body:
        return Body(value=3)

    async def breaks() -> Body:
        raise InvalidImageFormat("not an image")

    async def cancelled() -> Body:
        raise TaskCancelled("t7")

    assert asyncio.run(api_tasks.run_tracked(store, "t5", "r", "m", works)) == Body(value=3)
    assert store.get("t5").result == {"value": 3}
    ctx = SimpleNamespace(response=SimpleNamespace(status_code=200))
    failed = asyncio.run(api_tasks.run_tracked(store, "t6", "r", "m", breaks, ctx))
    assert failed.status_code == 400 and ctx.response.status_code == 400 and json.loads(failed.body)["error"]["code"] == "INVALID_IMAGE_FORMAT"
    assert store.get("t6").status == "failed"
    stopped = asyncio.run(api_tasks.run_tracked(store, "t7", "r", "m", cancelled))
    assert stopped.status_code == 409 and json.loads(stopped.body)["error"]["code"] == "TASK_CANCELLED"

    async def cancelled_at_the_end() -> Body:
        store.cancel("t8")
        return Body(value=1)

    assert asyncio.run(api_tasks.run_tracked(store, "t8", "r", "m", cancelled_at_the_end)).status_code == 409
    assert store.get("t8").status == "cancelled" and store.get("t8").result is None


def test_what_an_attempt_leaves_beside_its_result_waits_for_the_commit(store: TaskStore) -> None:
    """`after_commit` (an MRI attempt caching what /feedback needs) runs once the result is committed, never for an
    attempt whose fenced completion the store refused (a superseded attempt: `PostgresTaskStore.complete` False)."""
    remembered: list[str] = []

    class Superseded(TaskStore):
        def complete(self, task_id, result):
            return False

    async def works() -> Body:
        return Body(value=1)

    def remember(name: str):
        async def after_commit() -> None:
            remembered.append(name)
        return after_commit

    asyncio.run(api_tasks.run_tracked(store, "t9", "r", "m", works, after_commit=remember("winner")))
    superseded = Superseded(store.path)
    asyncio.run(api_tasks.run_tracked(superseded, "t10", "r", "m", works, after_commit=remember("superseded")))
    assert remembered == ["winner"]


def test_status_and_cancel_responses(store: TaskStore, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(api_tasks, "bentoml_result_store_path", lambda: tmp_path / "absent.db")
    assert api_tasks.task_status(store, "nope", "").status_code == 404
    assert api_tasks.cancel_task(store, "nope", "").status_code == 404
    store.create("t8", None, "m")
    assert json.loads(api_tasks.task_status(store, "t8", "").body)["status"] == "pending"
    assert json.loads(api_tasks.cancel_task(store, "t8", "").body)["status"] == "cancelled"


def _bentoml_store(path, rows) -> None:
    from _bentoml_impl.tasks import Sqlite3Store

    Sqlite3Store.init_db(str(path))
    with sqlite3.connect(path) as connection:
        for task_id, status, result in rows:
            connection.execute("INSERT INTO result (task_id, name, input, status, result, completed_at) VALUES "
                               "(?, 'x', '{}', ?, ?, CASE WHEN ? IS NULL THEN NULL ELSE CURRENT_TIMESTAMP END)",
                               (task_id, status, result, result))


def _stored(status: int, body) -> str:
    return json.dumps({"status": status, "headers": [], "content": base64.b64encode(json.dumps(body).encode()).decode()})


def test_tasks_only_bentoml_knows(store: TaskStore, tmp_path, monkeypatch) -> None:
    path = tmp_path / "bentoml.db"
    _bentoml_store(path, [
        ("queued", "in_progress", None),
        ("invalid", "failed", _stored(400, {"error": "1 validation error", "detail": [{"loc": ["patient_id"]}]})),
        ("listed", "failed", _stored(422, [{"error": "listed"}])),
        ("ours", "failed", _stored(413, {"success": False, "error": {"code": "IMAGE_TOO_LARGE", "message": "big"}})),
        ("garbled", "failed", "not json"),
    ])
    monkeypatch.setattr(api_tasks, "bentoml_result_store_path", lambda: path)
    status = lambda task_id: json.loads(api_tasks.task_status(store, task_id, "").body)
    assert status("queued")["status"] == "processing" and status("queued")["current_step"] == "queued"
    invalid = status("invalid")
    assert invalid["status"] == "failed" and invalid["error"]["code"] == "INVALID_REQUEST"
    assert invalid["error"]["details"] == {"errors": [{"loc": ["patient_id"]}]}
    assert status("listed")["error"]["message"] == "listed"
    assert status("ours")["error"]["code"] == "IMAGE_TOO_LARGE"
    assert status("garbled")["error"]["code"] == "INTERNAL_SERVER_ERROR"
    assert api_tasks.task_status(store, "absent", "").status_code == 404


def test_result_store_goes_to_a_private_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(api_tasks.RESULT_STORE_ENV, raising=False)
    path = api_tasks.configure_bentoml_result_store(tmp_path / "data")
    assert path == (tmp_path / "data").resolve() / "bentoml-tasks" / "task_result.db"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700" and os.environ[api_tasks.RESULT_STORE_ENV] == str(path)
    monkeypatch.setenv(api_tasks.RESULT_STORE_ENV, "/elsewhere.db")
    assert str(api_tasks.configure_bentoml_result_store(tmp_path / "data")) == "/elsewhere.db"


def test_current_task_id() -> None:
    assert api_tasks.current_task_id(SimpleNamespace(request=SimpleNamespace(state=SimpleNamespace(task_id="abc")))) == "abc"
    assert api_tasks.current_task_id(None).startswith("task_")


def test_task_routes_middleware_scrubs_submissions_and_cancels_through_our_store(tmp_path) -> None:
    seen = []

    async def app(scope, receive, send):
        seen.append(dict(scope["headers"]))

    middleware = api_tasks.TaskRoutesMiddleware(app, task_routes=("/predict/mri_segmentation",),
                                              settings=Settings(data_dir=str(tmp_path)))
    headers = [(b"authorization", b"Bearer secret"), (b"x-other", b"1")]
    for path in ("/predict/mri_segmentation/submit", "/predict/mri_segmentation/status"):
        asyncio.run(middleware({"type": "http", "method": "POST", "path": path, "headers": headers}, None, None))
    assert seen[0] == {b"x-other": b"1"} and seen[1][b"authorization"] == b"Bearer secret"

    middleware.tasks.create("t9", None, "m")
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    for query in (b"task_id=t9", b""):
        scope = {"type": "http", "method": "PUT", "path": "/predict/mri_segmentation/cancel", "headers": [],
                 "query_string": query}
        asyncio.run(middleware(scope, receive, send))
    assert sent[0]["status"] == 200 and json.loads(sent[1]["body"])["status"] == "cancelled"
    assert sent[2]["status"] == 400 and len(seen) == 2


def test_fail_unfinished_fails_one_owners_tasks_or_those_whose_owner_is_gone(store: TaskStore) -> None:
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    for task_id in ("mine", "done", "orphaned", "live"):
        store.create(task_id, None, "mri_segmentation")
    store.complete("done", {"ok": True})
    with sqlite3.connect(store.path) as connection:
        connection.execute("UPDATE tasks SET owner_pid = ? WHERE task_id = 'orphaned'", (ended.pid,))
        connection.execute("UPDATE tasks SET owner_pid = ? WHERE task_id = 'live'", (os.getppid(),))
    error = {"success": False, "error": {"code": "INTERNAL_SERVER_ERROR", "message": "stopped", "details": {}}}
    assert store.fail_unfinished(error, owner_pid=os.getpid()) == ["mine"]
    assert (store.get("mine").status, store.get("done").status, store.get("live").status) == \
        ("failed", "completed", "pending")
    assert store.fail_unfinished(error) == ["orphaned"]  # a live process's task is left to it
    assert store.get("orphaned").error["message"] == "stopped" and store.get("done").result == {"ok": True}
    assert store.get("live").status == "pending" and store.cancel_requested("mine") and not store.cancel_requested("live")


def test_a_task_bentoml_queued_but_did_not_start_can_be_cancelled(store: TaskStore, tmp_path, monkeypatch) -> None:
    """Cancelled right after submission (before its body entered our store): its body then stops at its first step."""
    path = tmp_path / "bentoml.db"
    _bentoml_store(path, [("queued", "in_progress", None), ("done", "completed", _stored(200, {}))])
    monkeypatch.setattr(api_tasks, "bentoml_result_store_path", lambda: path)
    assert json.loads(api_tasks.cancel_task(store, "queued", "").body)["status"] == "cancelled"
    assert api_tasks.cancel_task(store, "done", "").status_code == 404  # finished: nothing to cancel

    async def body() -> BaseModel:
        store.report("queued", "decoding")
        raise AssertionError("the body of a cancelled task went past its first step")

    answer = asyncio.run(api_tasks.run_tracked(store, "queued", "req-q", "mri_segmentation", body))
    assert json.loads(answer.body)["error"]["code"] == "TASK_CANCELLED"
    assert store.get("queued").status == "cancelled"


def queue_middleware(tmp_path, reached: list[str], answered: asyncio.Event | None = None):
    """The task routes over a stand-in for BentoML that answers each submission with a new task id (after
    `answered` is set, when given), with a queue bound of 2."""

    async def bentoml(scope, receive, send):
        reached.append(scope["path"])
        if answered is not None:
            await answered.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        body = json.dumps({"task_id": f"t-{len(reached)}-{id(scope)}", "status": "in_progress"}).encode()
        await send({"type": "http.response.body", "body": body})

    settings = Settings(data_dir=str(tmp_path), limits={"mri_queue_max": 2})
    return api_tasks.TaskRoutesMiddleware(bentoml, task_routes=("/predict/mri_segmentation",), settings=settings)


async def submitted(middleware) -> list[dict]:
    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict/mri_segmentation", "headers": []}
    await middleware(scope, None, send)
    return sent


def test_a_submission_beyond_the_queue_bound_is_refused_with_retry_after(tmp_path) -> None:
    reached: list[str] = []
    middleware = queue_middleware(tmp_path, reached)
    middleware.tasks.create("running", None, "mri_segmentation")
    middleware.tasks.report("running", "inference")
    assert asyncio.run(submitted(middleware))[0]["status"] == 202 and len(reached) == 1  # one unfinished: room
    refused = asyncio.run(submitted(middleware))  # the task just accepted counts at once, before its body starts
    assert refused[0]["status"] == 429 and (b"retry-after", b"30") in refused[0]["headers"]
    assert json.loads(refused[1]["body"])["error"]["details"]["reason"] == "task_queue_full" and len(reached) == 1
    middleware.tasks.complete("running", {})
    assert asyncio.run(submitted(middleware))[0]["status"] == 202  # a finished task frees its place
    assert middleware.tasks.backlog().counts["pending"] == 2


def test_submissions_arriving_together_never_pass_the_queue_bound_together(tmp_path) -> None:
    """Six at once, none answered yet (BentoML answers before a task's body registers it): two get a place."""
    reached: list[str] = []

    async def scenario() -> list[int]:
        answered = asyncio.Event()
        middleware = queue_middleware(tmp_path, reached, answered)
        submissions = [asyncio.create_task(submitted(middleware)) for _ in range(6)]
        refused: list[int] = []
        while len(reached) + len(refused) < 6:  # each either reached BentoML or was refused
            await asyncio.sleep(0.01)
            refused = [task.result()[0]["status"] for task in submissions if task.done()]
        answered.set()
        return [task_result[0]["status"] for task_result in await asyncio.gather(*submissions)]

    statuses = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert sorted(statuses) == [202, 202, 429, 429, 429, 429] and len(reached) == 2


def test_tasks_beyond_the_worker_s_slots_wait_pending_in_turn(store: TaskStore) -> None:
    """One slot: the second task is registered and stays `pending` until the first has finished."""

    class Done(BaseModel):
        name: str

    async def scenario() -> list[str]:
        slots, order, release = PriorityGate(1), [], asyncio.Event()

        async def work(name: str) -> Done:
            order.append(f"{name} starts")
            store.report(name, "inference")
            if name == "first":
                await release.wait()
            order.append(f"{name} ends")
            return Done(name=name)

        first = asyncio.create_task(api_tasks.run_tracked(store, "first", None, "m", lambda: api_tasks.in_turn(
            slots, "routine", lambda: work("first"))))
        while getattr(store.get("first"), "status", None) != "processing":
            await asyncio.sleep(0.001)  # the records are written in threads
        second = asyncio.create_task(api_tasks.run_tracked(store, "second", None, "m", lambda: api_tasks.in_turn(
            slots, "routine", lambda: work("second"))))
        while store.get("second") is None:
            await asyncio.sleep(0.001)
        order.append(f"second is {store.get('second').status}")
        release.set()
        await asyncio.gather(first, second)
        return order

    assert asyncio.run(scenario()) == ["first starts", "second is pending", "first ends", "second starts",
                                       "second ends"]
    assert store.get("second").status == "completed"
