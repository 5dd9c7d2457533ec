"""PACS on two replicas sharing PostgreSQL (issue #23): both run the PACS connection against one real Orthanc. A study
notified to both replicas becomes one job and one result set in Orthanc; a replica killed (SIGKILL) while it runs a
job loses nothing: once its lease expires the other replica runs the job again and Orthanc holds one result set."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from state.pacs_jobs_pg import JOBS, LEASE_S
from tests.orthanc import Orthanc, require_orthanc
from tests.pacs.conftest import OUR_MANUFACTURER, Study, mr_study, wait_for
from tests.replicas import ReplicaSet

pytestmark = pytest.mark.replicas

RESULT_KINDS = 3
"""SEG, measurement report and uncertainty map: what the replicas' MR rule stores (tests/replicas.py)."""
DEADLINE_S = 240.0


@pytest.fixture(scope="module")
def orthanc(replicas: ReplicaSet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """An Orthanc on the port the replicas' PACS configuration names."""
    server = Orthanc(binary=require_orthanc(), root=tmp_path_factory.mktemp("orthanc"), http_port=replicas.pacs_port)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


def rows(replicas: ReplicaSet, study_uid: str) -> list[dict]:
    """The study's job rows (lease holder and attempt: what no HTTP body shows)."""
    with psycopg.connect(replicas.database_url, row_factory=dict_row) as connection:
        return connection.execute(f"SELECT * FROM {JOBS} WHERE study_uid = %s", (study_uid,)).fetchall()


def result_set(orthanc: Orthanc, study_uid: str) -> list[str]:
    """The SOPInstanceUIDs of our objects in the study, instance by instance (a second result set would double them)."""
    found = []
    for series in orthanc.series_of_study(study_uid):
        if series["MainDicomTags"].get("Manufacturer") == OUR_MANUFACTURER:
            found += [orthanc.get(f"/instances/{instance}")["MainDicomTags"]["SOPInstanceUID"]  # type: ignore[index]
                      for instance in series["Instances"]]
    return found


def evidence(replicas: ReplicaSet, study: Study) -> str:
    return "\n".join(f"{row['state']} runs={row['runs']} attempt={row['attempt']} lease={row['lease_owner']} "
                     f"log={row['log']}" for row in rows(replicas, study.uid))


def notify(replicas: ReplicaSet, replica_name: str, study: Study) -> None:
    """Notify as a well-behaved notifier does: a 503 with Retry-After (the database briefly away, say right after the
    outage test) is sent again."""
    def accepted() -> bool:
        answer = httpx.post(f"{replicas.replica(replica_name).url}/pacs/notify",
                            json={"study_instance_uid": study.uid}, headers=replicas.admin_headers, timeout=30)
        assert answer.status_code in (202, 503) and (answer.status_code == 202 or "retry-after" in answer.headers), \
            answer.text
        return answer.status_code == 202

    wait_for(accepted, DEADLINE_S, "the notification accepted")


def finished(replicas: ReplicaSet, orthanc: Orthanc, study: Study) -> tuple[dict, list[str]]:
    """The study's one job once it is done, and our instances in Orthanc by then."""
    (job,) = wait_for(lambda: [r for r in rows(replicas, study.uid) if r["state"] in ("done", "failed")], DEADLINE_S,
                      "the job to finish", evidence=lambda: evidence(replicas, study))  # type: ignore[misc]
    assert job["state"] == "done", evidence(replicas, study)
    return job, result_set(orthanc, study.uid)


def test_a_study_notified_to_both_replicas_is_one_job_and_one_result_set(replicas: ReplicaSet,
                                                                          orthanc: Orthanc) -> None:
    study = mr_study(seed=3)
    orthanc.upload(study.files)
    for name in ("a", "b", "a", "b"):
        notify(replicas, name, study)
    job, instances = finished(replicas, orthanc, study)
    print(f"one job, {job['runs']} run(s), attempt {job['attempt']}")  # a run the runner shed is queued again
    assert len(rows(replicas, study.uid)) == 1
    assert len(instances) == len(set(instances)) == RESULT_KINDS
    assert sorted(instances) == sorted(r["sop_instance_uid"] for r in job["results"])
    with replicas.client(timeout=30) as balancer:  # either replica shows the same job
        listed = [balancer.get("/pacs/jobs", params={"study_instance_uid": study.uid},
                               headers=replicas.admin_headers).json() for _ in range(2)]
    assert [[j["job_id"] for j in answer] for answer in listed] == [[job["job_id"]]] * 2
    folder = replicas.shared_dir / "pacs" / "results" / job["job_id"]
    wait_for(lambda: not folder.exists(), 30, "the exported files removed from the shared volume")


def test_a_replica_killed_mid_job_is_taken_over_and_the_pacs_holds_one_result_set(both_serving: ReplicaSet,
                                                                                   orthanc: Orthanc) -> None:
    replicas = both_serving
    victims = {replica.name: replica.processes() for replica in replicas.replicas}
    study = mr_study(seed=5)
    orthanc.upload(study.files)
    notify(replicas, "a", study)
    running = wait_for(lambda: [r for r in rows(replicas, study.uid) if r["state"] == "running"], 120,
                       "the job to run", interval_s=0.02, evidence=lambda: evidence(replicas, study))
    (first,) = running  # type: ignore[misc]
    holder = first["lease_owner"].split("/")[0]
    replicas.replica(holder).kill(victims[holder])
    killed_at = time.monotonic()
    (killed,) = rows(replicas, study.uid)
    assert (killed["state"], killed["attempt"], killed["lease_owner"]) == ("running", 1, first["lease_owner"]), \
        "the job left `running` before its replica was killed: nothing to take over"
    assert result_set(orthanc, study.uid) == []
    job, instances = finished(replicas, orthanc, study)
    taken_over_s = time.monotonic() - killed_at
    survivor = replicas.other(holder).name
    assert job["runs"] == 2 and job["attempt"] == 2 and len(rows(replicas, study.uid)) == 1
    assert any(entry["message"].startswith(f"the lease of {first['lease_owner']} expired: running it again here "
                                           f"({survivor}/") for entry in job["log"]), evidence(replicas, study)
    assert len(instances) == len(set(instances)) == RESULT_KINDS
    assert sorted(instances) == sorted(r["sop_instance_uid"] for r in job["results"])
    print(f"takeover: SIGKILL of replica {holder} -> results in Orthanc through replica {survivor}: {taken_over_s:.1f} s "
          f"(lease {LEASE_S:.0f} s); job log {[(e['at'][11:19], e['message'][:48]) for e in job['log']]}")
