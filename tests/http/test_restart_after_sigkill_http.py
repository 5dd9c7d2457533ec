"""One server, one data directory, every kind of process SIGKILLed (issue 14, "a server starts cleanly after any of
its processes was killed"):

- an API worker, then a runner, killed while requests write the feedback database and the request cache: BentoML
  starts another each time and the server answers again; then the whole server is SIGKILLed (a node lost) and a new
  `bentoml serve` in the same directories starts and answers (and survives losing an API worker too);
- the arbiter alone killed (its workers orphaned), and a new server starts while they end.

Each new server must find every earlier feedback record and finished task record, and classify.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest
from pydicom.data import get_testdata_file

from tests.http.test_mri_http import wait_for
from tests.http.test_shutdown_http import ROUTE, SHUTDOWN_BOUND_S, Server, alive, servers, wait_gone  # noqa: F401
from tests.unit.mri.mri_inputs import four_d_nifti, small_case

CT_SMALL = Path(get_testdata_file("CT_small.dcm")).read_bytes()
RECOVERY_BOUND_S = 120.0
"""How long BentoML may take to replace a killed worker or runner (it restarts one in 20-40 s on this machine)."""


class Writers:
    """Clients that classify and post feedback without pause (so the killed process is likely mid-write)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.count = 0
        self.acknowledged: list[int] = []
        """The ids of the feedback records the server answered as stored."""
        self.threads = [threading.Thread(target=self._loop, args=(n,), daemon=True) for n in range(2)]

    def _loop(self, number: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.stop.is_set():
                request_id = f"w{number}-{self.count}"
                self.count += 1
                with contextlib.suppress(httpx.HTTPError):  # the killed process drops its connections
                    if http.post("/predict/ct_classification", files={"image": ("ct.dcm", CT_SMALL)},
                                 data={"patient_id": "P000001", "request_id": request_id}).status_code == 200:
                        stored = http.post("/feedback", json={"request_id": request_id, "verdict": "accept",
                                                              "reviewer_id": "dr_kill"})
                        if stored.status_code in (200, 201):
                            self.acknowledged.append(stored.json()["feedback_id"])

    def __enter__(self) -> Writers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def wait_answers(url: str) -> None:
    """Until /health is 200 and a CT slice is classified (a replaced worker or runner is serving)."""
    deadline = time.monotonic() + RECOVERY_BOUND_S
    while True:
        with contextlib.suppress(httpx.HTTPError), httpx.Client(base_url=url, timeout=30) as http:
            if http.get("/health").status_code == 200 and http.post(
                    "/predict/ct_classification", files={"image": ("ct.dcm", CT_SMALL)},
                    data={"patient_id": "P000001"}).status_code == 200:
                return
        assert time.monotonic() < deadline, "the server did not answer again after the kill"
        time.sleep(1)


def feedback_ids(data_dir: str) -> set[int]:
    with contextlib.closing(sqlite3.connect(Path(data_dir) / "feedback" / "feedback.sqlite3")) as db:
        return {row[0] for row in db.execute("SELECT id FROM feedback")}


def kill_under_writes(server: Server, pick: Callable[[Server], psutil.Process]) -> list[int]:
    """SIGKILL one process of `server` while clients write; wait until the server answers again. The ids of the
    feedback records acknowledged meanwhile."""
    with Writers(server.url) as writers:
        while writers.count < 6:
            time.sleep(0.1)
        victim = pick(server)
        victim.kill()
        time.sleep(1)
    wait_answers(server.url)
    return writers.acknowledged


def crash(server: Server) -> None:
    """SIGKILL every process of the server at once (the node is lost); nothing gets to clean up. BentoML starts each
    worker in a session of its own, so they are found as the arbiter's children, not by process group."""
    arbiter = psutil.Process(server.process.pid)
    tree = [arbiter, *arbiter.children(recursive=True)]
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    server.process.wait()
    wait_gone(tree, time.monotonic(), SHUTDOWN_BOUND_S)


@pytest.mark.slow
def test_a_new_server_starts_after_any_process_was_killed(servers) -> None:
    env, state, started = servers
    env = {**env, "NEURONOVA_FEEDBACK__DATABASE_URL": ""}  # the embedded SQLite feedback database, whatever the session set
    first = Server(env, state / "first.log")
    started.append(first)
    with httpx.Client(base_url=first.url, timeout=120) as http:
        case = four_d_nifti(small_case(), compressed=True)
        done_id = http.post(f"{ROUTE}/submit", files={"image": ("case.nii.gz", case)},
                            data={"patient_id": "P000911"}).json()["task_id"]
        assert wait_for(http, done_id, {"completed", "failed"})["status"] == "completed"

    acknowledged = kill_under_writes(first, lambda server: server.by_role("neuronova:")[0])  # an API worker
    acknowledged += kill_under_writes(first, lambda server: server.by_role("CTClassifier:")[0])  # a runner
    assert acknowledged and set(acknowledged) <= feedback_ids(env["NEURONOVA_DATA_DIR"])
    crash(first)
    second = Server(env, state / "second.log")
    started.append(second)
    wait_answers(second.url)
    acknowledged += kill_under_writes(second, lambda server: server.by_role("neuronova:")[0])
    assert set(acknowledged) <= feedback_ids(env["NEURONOVA_DATA_DIR"])  # every record acknowledged, by id

    orphans = [p for p in second.tree if p.pid != second.process.pid]
    second.process.send_signal(signal.SIGKILL)  # the arbiter alone: its workers are orphaned
    second.process.wait()
    third = Server(env, state / "third.log")
    started.append(third)
    wait_gone(orphans, time.monotonic(), SHUTDOWN_BOUND_S)
    wait_answers(third.url)
    with httpx.Client(base_url=third.url, timeout=120) as http:
        kept = http.get(f"/task/{done_id}").json()
    assert kept["status"] == "completed" and kept["result"]["result"]["mask"]["shape"], kept["status"]
    assert set(acknowledged) <= feedback_ids(env["NEURONOVA_DATA_DIR"])
    assert not alive([p for server in (first, second) for p in server.tree])
