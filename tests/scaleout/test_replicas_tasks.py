"""MRI tasks across two replicas sharing PostgreSQL (issue #14, tests 1, 2, 3 and 7): any replica answers for any task,
a replica killed or frozen mid-inference loses nothing and cannot overwrite the takeover's result, a cancel reaches
the replica running the task, and a restart of both keeps every task and result."""

from __future__ import annotations

import base64
import gzip
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import nibabel as nib
import numpy as np
import psycopg
import pytest
from psycopg.rows import dict_row

from state.pg_tasks import TABLE
from state.tasks import STEP_PROGRESS
from tests.replicas import Replica, ReplicaSet, wait_balanced
from tests.unit.mri.mri_inputs import four_d_nifti
from training_export.synthetic_mri import synthetic_case

pytestmark = pytest.mark.replicas

ROUTE = "/predict/mri_segmentation"
TAKEOVER_DEADLINE_S = 60.0
TASK_DEADLINE_S = 240.0
SMALL = four_d_nifti(synthetic_case(13, (96, 96, 64), (2.0, 2.0, 2.0)), compressed=True)
"""The demo-size study of the HTTP tests: seconds per task."""
LARGE = four_d_nifti(synthetic_case(11, (160, 160, 120), (1.2, 1.2, 1.2)), compressed=True)
"""A study whose inference (with 8 uncertainty passes) lasts long enough to kill, freeze or cancel it mid-way."""
seen_tasks: dict[str, dict] = {}
"""Every task this module finished, with its polling body, for the restart test."""


def submit(client: httpx.Client, study: bytes, **fields: str) -> tuple[str, str]:
    """Submit a study; (task id, the replica that accepted it)."""
    response = client.post(f"{ROUTE}/submit", files={"image": ("case.nii.gz", study)},
                           data={"patient_id": "P000077", **fields})
    assert response.status_code == 200, response.text
    return response.json()["task_id"], response.headers["x-replica"]


def row(replicas: ReplicaSet, task_id: str) -> dict:
    """The task's shared row (owner, attempt: what no HTTP body shows)."""
    with psycopg.connect(replicas.database_url, row_factory=dict_row) as connection:
        return connection.execute(f"SELECT * FROM {TABLE} WHERE task_id = %s", (task_id,)).fetchone()


def wait_until(condition: Callable[[], dict | None], deadline_s: float, what: str, poll_s: float = 0.1) -> dict:
    deadline = time.monotonic() + deadline_s
    while not (found := condition()):
        assert time.monotonic() < deadline, f"not {what} after {deadline_s} s"
        time.sleep(poll_s)
    return found


def running_on(replicas: ReplicaSet, task_id: str, step: str = "inference", poll_s: float = 0.05) -> Replica:
    """Wait until the task is in `step` (or later) of a run; the replica running it."""
    def reached() -> dict | None:
        found = row(replicas, task_id)
        assert found["status"] in ("pending", "processing"), found
        return found if found["owner"] and STEP_PROGRESS.get(found["current_step"], -1) >= STEP_PROGRESS[step] else None

    return replicas.replica(wait_until(reached, TASK_DEADLINE_S, f"in {step}", poll_s)["owner"])


def finished(client: httpx.Client, task_id: str, deadline_s: float = TASK_DEADLINE_S) -> dict:
    def done() -> dict | None:
        polled = client.get(f"/task/{task_id}").json()
        return polled if polled["status"] in ("completed", "failed", "cancelled") else None

    polled = wait_until(done, deadline_s, f"finished ({task_id})", 0.2)
    seen_tasks[task_id] = polled
    return polled


def mask_of(polled: dict) -> np.ndarray:
    data = gzip.decompress(base64.b64decode(polled["result"]["result"]["mask"]["data_base64"]))
    return np.asarray(nib.Nifti1Image.from_bytes(data).dataobj)


def result_files(replicas: ReplicaSet, task_id: str) -> list[str]:
    return sorted(p.name for p in (replicas.shared_dir / "tasks" / task_id).glob("result-*.json"))


def test_tasks_submitted_through_the_balancer_are_answered_by_the_other_replica(replicas: ReplicaSet) -> None:
    with replicas.client() as balancer:
        submitted = [submit(balancer, SMALL, request_id=f"r1-{i}") for i in range(4)]
    assert {accepted for _, accepted in submitted} == {"a", "b"}
    clients = {r.name: replicas.client(r) for r in replicas.replicas}
    try:
        for task_id, accepted in submitted:
            other = clients[replicas.other(accepted).name]
            first = other.get(f"/task/{task_id}")  # registered before the submission was answered
            assert first.status_code == 200 and first.json()["status"] in ("pending", "processing", "completed")
            polled = finished(other, task_id)
            assert polled["status"] == "completed", polled["error"]
            assert other.get(f"/predict/task_status/{task_id}").json() == polled
            assert other.get(f"{ROUTE}/status", params={"task_id": task_id}).json()["status"] == "completed"
            fetched = other.get(f"{ROUTE}/get", params={"task_id": task_id})
            assert fetched.status_code == 200 and fetched.json() == polled["result"]
            assert fetched.json()["task_id"] == task_id and row(replicas, task_id)["attempt"] == 1
        # Each replica's queue worker took some (one at a time each): the answers are the same whichever ran them.
        ran_on = {row(replicas, task_id)["owner"]: task_id for task_id, _ in submitted}
        assert set(ran_on) == {"a", "b"}
        reference = seen_tasks[ran_on["a"]]
        for task_id, _ in submitted:
            assert np.array_equal(mask_of(seen_tasks[task_id]), mask_of(reference))
            assert seen_tasks[task_id]["result"]["result"]["tumor_volume_ml"] == \
                reference["result"]["result"]["tumor_volume_ml"]
        for replica in replicas.replicas:  # measured, not asserted (docs/scale-out.md)
            print(f"replica {replica.name}: {len(replica.processes())} processes, {replica.rss_mib():.0f} MiB resident "
                  "after MRI tasks")
        unknown = clients["b"].get(f"{ROUTE}/get", params={"task_id": "task_unknown"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "NOT_FOUND"
    finally:
        for client in clients.values():
            client.close()


def test_a_replica_killed_mid_inference_loses_nothing(both_serving: ReplicaSet) -> None:
    replicas = both_serving
    with replicas.client() as balancer:
        task_id, _ = submit(balancer, LARGE, uncertainty="true")
    victim = running_on(replicas, task_id)
    survivor = replicas.other(victim)
    killed_at = time.monotonic()
    victim.kill()
    with replicas.client(survivor) as client:
        polled = finished(client, task_id, TAKEOVER_DEADLINE_S)
    takeover_s = time.monotonic() - killed_at
    print(f"takeover: task finished on replica {survivor.name} {takeover_s:.1f} s after SIGKILL of {victim.name}")
    assert polled["status"] == "completed", polled["error"]
    shared = row(replicas, task_id)
    assert (shared["owner"], shared["attempt"]) == (survivor.name, 2)
    assert result_files(replicas, task_id) == ["result-2.json"]  # exactly one result
    wait_balanced(replicas.balancer_url, {survivor.name})  # the balancer's health check took the victim out
    with replicas.client() as balancer:
        assert {balancer.get(f"/task/{task_id}").headers["x-replica"] for _ in range(4)} == {survivor.name}


def frozen_past_its_last_check(replicas: ReplicaSet, tries: int = 3) -> tuple[str, Replica]:
    """Submit a study and freeze the replica running it once the run has entered its last step (`writing_outputs`:
    its last progress check is behind it, its result write is next); (task id, the frozen replica). The step lasts
    a fraction of a second: a task that finished before the freeze landed is submitted again."""
    for _ in range(tries):
        with replicas.client() as balancer:
            task_id, _ = submit(balancer, LARGE, uncertainty="true")
        try:
            runner = running_on(replicas, task_id, "writing_outputs", poll_s=0.01)
        except AssertionError:
            continue  # finished before it could be seen in its last step
        runner.pause()
        if row(replicas, task_id)["status"] == "processing":
            return task_id, runner
        runner.resume()
    pytest.fail(f"no run could be frozen in its last step in {tries} tries")


def test_a_frozen_attempt_resumed_after_the_takeover_cannot_overwrite_it(both_serving: ReplicaSet) -> None:
    replicas = both_serving
    task_id, frozen = frozen_past_its_last_check(replicas)
    try:
        with replicas.client(replicas.other(frozen)) as client:
            polled = finished(client, task_id, TAKEOVER_DEADLINE_S)
    finally:
        frozen.resume()
    assert polled["status"] == "completed", polled["error"]
    assert row(replicas, task_id)["attempt"] == 2
    # The old attempt resumes past its last check, so it does reach its result write: wait for that write to be
    # refused (its own log line), then check that nothing of it reached the task.
    refused = f"task {task_id}@1: the result of this run was refused"
    wait_until(lambda: refused in frozen.log_path.read_text(errors="replace"), TASK_DEADLINE_S,
               "the frozen attempt's result write refused", 0.2)
    with replicas.client(frozen) as client:
        assert client.get(f"/task/{task_id}").json() == polled
    assert result_files(replicas, task_id) == ["result-2.json"]  # its result-1.json was deleted


def test_a_cancel_sent_to_one_replica_stops_the_task_on_the_other(replicas: ReplicaSet) -> None:
    with replicas.client() as balancer:
        task_id, _ = submit(balancer, LARGE, uncertainty="true")
    runner = running_on(replicas, task_id)
    with replicas.client(replicas.other(runner)) as other:  # BentoML's own cancel route (DELETE /task/<id> alike)
        cancelled = other.put(f"{ROUTE}/cancel", params={"task_id": task_id})
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    with psycopg.connect(replicas.database_url) as connection:  # the run on `runner` stops at its next window batch
        wait_until(lambda: connection.execute(
            "SELECT count(*) = 0 FROM procrastinate_jobs WHERE status = 'doing' AND args->>'task_id' = %s",
            (task_id,)).fetchone()[0], 60, "stopped on the replica running it", 0.2)
    with replicas.client(runner) as client:
        polled = client.get(f"/task/{task_id}").json()
        stored = client.get(f"{ROUTE}/get", params={"task_id": task_id})
    assert polled["status"] == "cancelled" and polled["progress"] < STEP_PROGRESS["postprocessing"]
    assert stored.status_code == 409 and stored.json()["error"]["code"] == "TASK_CANCELLED"
    assert result_files(replicas, task_id) == []
    seen_tasks[task_id] = polled


def test_both_replicas_restarted_keep_every_task_and_hand_back_the_running_one(both_serving: ReplicaSet) -> None:
    replicas = both_serving
    assert seen_tasks, "run with the module's earlier tests"
    with replicas.client() as balancer:
        inflight, _ = submit(balancer, LARGE, uncertainty="true")
    running_on(replicas, inflight)
    with ThreadPoolExecutor(len(replicas.replicas)) as pool:  # SIGTERM to both at once, as a rollout of all pods
        stopped = list(pool.map(Replica.stop, replicas.replicas))
    assert all(seconds < 30 for seconds in stopped), stopped
    assert not any(replica.processes() for replica in replicas.replicas)
    assert row(replicas, inflight)["status"] == "pending"  # handed back to the queue, not failed
    replicas.ensure_serving()
    with replicas.client() as balancer:
        for task_id, before in seen_tasks.items():
            assert balancer.get(f"/task/{task_id}").json() == before
            if before["status"] == "completed":
                assert balancer.get(f"{ROUTE}/get", params={"task_id": task_id}).json() == before["result"]
        polled = finished(balancer, inflight)
    assert polled["status"] == "completed", polled["error"]
    attempt = row(replicas, inflight)["attempt"]  # 2, or 3 when one replica took it over before it stopped too
    assert attempt >= 2 and result_files(replicas, inflight) == [f"result-{attempt}.json"]
