"""Each real replica keeps to its PostgreSQL connection budget (`state.shared_db.replica_budget`) under real traffic —
MRI tasks, classification, feedback, a rate-limited route, from several clients at once — and every connection to
the replicas' database is named `neuronova:<replica>:<role>` in `pg_stat_activity`."""

from __future__ import annotations

import contextlib
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from pydicom.data import get_testdata_file

from state import shared_db
from tests.http.conftest import make_token
from tests.pg_activity import ConnectionSamples, connections
from tests.replicas import API_WORKERS, RATE_LIMITED_ROUTE, Replica, ReplicaSet
from tests.unit.mri.mri_inputs import four_d_nifti
from training_export.synthetic_mri import synthetic_case

pytestmark = pytest.mark.replicas

API_SERVICE = "neuronova"
CT_SMALL = Path(get_testdata_file("CT_small.dcm")).read_bytes()
MRI_SMALL = four_d_nifti(synthetic_case(13, (96, 96, 64), (2.0, 2.0, 2.0)), compressed=True)
CLIENTS = 8
ROUNDS = 3
MRI_TASKS = 4
TASK_DEADLINE_S = 240.0


def service_names(replica: Replica) -> list[str]:
    """The BentoML service each worker process of the replica runs (`--service-name`; the arbiter has none)."""
    names = []
    for process in replica.processes():
        with contextlib.suppress(psutil.Error):
            command = process.cmdline()
            if "--service-name" in command:
                names.append(command[command.index("--service-name") + 1])
    return names


def target(replicas: ReplicaSet, index: int) -> Replica:
    """The replica the `index`th client talks to, directly: the balancer's health checks may take a replica out of
    rotation for a moment on a loaded 2-core machine (its 503s are not the replicas' answers)."""
    return replicas.replicas[index % len(replicas.replicas)]


def clinician_round(replicas: ReplicaSet, client_index: int) -> list[int]:
    """One client's traffic: classify, give feedback, hit the rate-limited route; the statuses."""
    token = make_token(subject=f"budget-{client_index}-{uuid.uuid4().hex[:6]}")
    statuses = []
    with httpx.Client(base_url=target(replicas, client_index).url, headers={"Authorization": f"Bearer {token}"},
                      timeout=120) as client:
        for round_index in range(ROUNDS):
            request_id = f"budget-{client_index}-{round_index}-{uuid.uuid4().hex[:6]}"
            predicted = client.post("/predict/ct_classification", files={"image": ("ct.dcm", CT_SMALL)},
                                    data={"patient_id": "P000001", "request_id": request_id})
            feedback = client.post("/feedback", json={"request_id": request_id, "verdict": "accept",
                                                      "reviewer_id": "dr_budget"})
            statuses += [predicted.status_code, feedback.status_code, client.get(RATE_LIMITED_ROUTE).status_code]
    return statuses


def mri_task(replicas: ReplicaSet, index: int) -> str:
    """Submit one MRI study and poll it until it ends (either replica's queue worker may run it); its status."""
    with replicas.client(target(replicas, index)) as client:
        submitted = client.post("/predict/mri_segmentation/submit", files={"image": ("case.nii.gz", MRI_SMALL)},
                                data={"patient_id": "P000077", "request_id": f"budget-mri-{index}"})
        assert submitted.status_code == 200, submitted.text
        task_id = submitted.json()["task_id"]
        deadline = time.monotonic() + TASK_DEADLINE_S
        while (status := client.get(f"/task/{task_id}").json()["status"]) in ("pending", "processing"):
            assert time.monotonic() < deadline, f"task {task_id} still {status} after {TASK_DEADLINE_S} s"
            time.sleep(0.2)
    return status


def test_each_replica_keeps_to_its_connection_budget_under_traffic(replicas: ReplicaSet) -> None:
    processes = {replica.name: service_names(replica) for replica in replicas.replicas}
    with ConnectionSamples(replicas.database_url) as seen, ThreadPoolExecutor(CLIENTS + MRI_TASKS) as pool:
        tasks = [pool.submit(mri_task, replicas, index) for index in range(MRI_TASKS)]
        rounds = [pool.submit(clinician_round, replicas, index) for index in range(CLIENTS)]
        assert [task.result() for task in tasks] == ["completed"] * MRI_TASKS
        statuses = [status for done in rounds for status in done.result()]
    assert statuses == [200] * (3 * CLIENTS * ROUNDS), statuses  # each client stays under the route's limit
    after = connections(replicas.database_url)

    named = {f"neuronova:{name}:{role}" for name in processes for role in ("api", "runner", "start")}
    assert seen.names() | set(after) <= named, f"connections not named by replica and role: {seen.names() | set(after)}"
    for name, services in processes.items():
        api_workers = services.count(API_SERVICE)
        runners = len(services) - api_workers
        budget = shared_db.replica_budget(api_workers, runners)
        peaks = {role: seen.peak(f"neuronova:{name}:{role}") for role in ("api", "runner")}
        held = sum(n for holder, n in after.items() if holder.startswith(f"neuronova:{name}:"))
        print(f"\nreplica {name}: {api_workers} API worker(s), {runners} runners; "
              f"peak {seen.peak(f'neuronova:{name}:')} "
              f"connections {peaks} over {len(seen.samples)} samples, {held} held after; budget {budget}")
        assert api_workers == API_WORKERS and runners >= 3, services
        assert peaks["api"] >= 1 and peaks["runner"] >= 1  # both roles hold connections, under their own names
        assert peaks["api"] <= api_workers * shared_db.process_budget("api")
        assert peaks["runner"] <= runners * shared_db.process_budget("runner")
        assert seen.peak(f"neuronova:{name}:") <= budget
