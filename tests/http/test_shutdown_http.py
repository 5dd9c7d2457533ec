"""One server's robustness, on dedicated served processes sharing one data directory (issue 14):

- a 1 MB zip expanding to 1 GiB of zeros (and one under the size limit that expands 1000x) is refused fast;
- after SIGKILL of the arbiter, a new server starts cleanly in the same directories while one orphaned worker still
  holds BentoML's task database (its `-wal`/`-shm` files no longer break the start), earlier task records are
  readable, and the orphans end by themselves;
- after SIGTERM to the arbiter every process of the server is gone within 30 s (Kubernetes' default grace), and the
  MRI task still in flight is failed with `details.reason == "server_shutdown"`, not left `processing`.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from bench.harness import BENTOML_SERVE, SERVER_TAG, free_port, kill_processes, start_process, tagged_processes
from bench.soak import role
from state.tasks import TaskStore, task_store_path
from tests.http.test_mri_http import wait_for, wait_for_step
from tests.unit.mri.mri_inputs import four_d_nifti, small_case

ROUTE = "/predict/mri_segmentation"
SHUTDOWN_BOUND_S = 30.0
REFUSAL_BOUND_S = 30.0
START_TIMEOUT_S = 240.0


class Server:
    """`bentoml serve` in its own process group, every process of it tagged in its environment (bench.harness)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.process = start_process(BENTOML_SERVE, env, log_path, port)
        self.log_path = log_path
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.process.poll() is None, f"server exited at start:\n{log_path.read_text()[-4000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"server not ready:\n{log_path.read_text()[-4000:]}"
            time.sleep(0.5)

    @property
    def tree(self) -> list[psutil.Process]:
        """Every live process of the server now, arbiter first: workers BentoML replaced and orphans included."""
        found = tagged_processes(SERVER_TAG, self.process.tag)
        return sorted(found, key=lambda p: p.pid != self.process.pid)

    def by_role(self, prefix: str) -> list[psutil.Process]:
        return [p for p in self.tree if role(p).startswith(prefix)]


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    def running(process: psutil.Process) -> bool:
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    return [p for p in processes if running(p)]


def wait_gone(processes: list[psutil.Process], since: float, bound_s: float) -> float:
    while alive(processes):
        assert time.monotonic() - since < bound_s, [(p.pid, role(p)) for p in alive(processes)]
        time.sleep(0.2)
    return time.monotonic() - since


def zeros_zip(size: int) -> bytes:
    """One DEFLATE member of `size` zero bytes with honest headers (about size/1000 bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive, \
            archive.open("series/slice.dcm", "w", force_zip64=True) as member:
        chunk = bytes(2**20)
        for _ in range(size // len(chunk)):
            member.write(chunk)
    return buffer.getvalue()


@pytest.fixture()
def servers(demo_models: dict[str, str], tmp_path: Path) -> Iterator[tuple[dict[str, str], Path, list[Server]]]:
    env = {"NEURONOVA_AUTH__ENABLED": "false", "NEURONOVA_RATE_LIMIT__ENABLED": "false",
           "NEURONOVA_DATA_DIR": str(tmp_path / "data"), "BENTOML_RESULT_STORE": str(tmp_path / "tasks.db")}
    started: list[Server] = []
    try:
        yield env, tmp_path, started
    finally:
        for server in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.process.pid, signal.SIGKILL)
            kill_processes(server.tree)
            server.process.wait(timeout=30)


@pytest.mark.slow
def test_bombs_refused_restart_after_sigkill_and_bounded_sigterm(servers) -> None:
    env, state, started = servers
    first = Server(env, state / "first.log")
    started.append(first)
    http = httpx.Client(base_url=first.url, timeout=120)

    for size, reason in ((2**30, "declared_bytes"), (200 * 2**20, "max_ratio")):
        bomb = zeros_zip(size)
        assert len(bomb) < 2 * 2**20
        sent = time.monotonic()
        answer = http.post(f"{ROUTE}/submit", files={"image": ("study.zip", bomb)}, data={"patient_id": "P000901"})
        if answer.status_code == 200:
            error = wait_for(http, answer.json()["task_id"], {"failed", "completed"})["error"]
        else:
            assert 400 <= answer.status_code < 500 and answer.json()["success"] is False
            error = answer.json()["error"]
        assert time.monotonic() - sent < REFUSAL_BOUND_S
        assert error["code"] == "IMAGE_TOO_LARGE" and reason in error["details"], error

    case = four_d_nifti(small_case(), compressed=True)
    done_id = http.post(f"{ROUTE}/submit", files={"image": ("case.nii.gz", case)},
                        data={"patient_id": "P000902"}).json()["task_id"]
    assert wait_for(http, done_id, {"completed", "failed"})["status"] == "completed"

    # SIGKILL the arbiter: its workers are orphaned; they notice and end. One API worker is frozen first, so it still
    # holds BentoML's task database (and its -wal/-shm files) while a new server starts in the same directories.
    [frozen, *_] = first.by_role("neuronova:")
    frozen.suspend()
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    assert Path(env["BENTOML_RESULT_STORE"] + "-wal").exists() and Path(env["BENTOML_RESULT_STORE"] + "-shm").exists()
    second = Server(env, state / "second.log")
    started.append(second)
    assert alive([frozen])
    frozen.resume()
    wait_gone(first.tree, time.monotonic(), SHUTDOWN_BOUND_S)
    http = httpx.Client(base_url=second.url, timeout=120)
    assert http.get("/health").status_code == 200
    kept = http.get(f"/task/{done_id}").json()
    assert kept["status"] == "completed" and kept["result"]["result"]["mask"]["shape"], kept["status"]

    # SIGTERM to the arbiter with an MRI task in flight, held in the runner (frozen) so it cannot finish.
    inflight_id = http.post(f"{ROUTE}/submit", files={"image": ("case.nii.gz", case)},
                            data={"patient_id": "P000903"}).json()["task_id"]
    wait_for_step(http, inflight_id, "inference")
    [runner] = second.by_role("MRISegmenter:")
    api_workers = second.by_role("neuronova:")
    runner.suspend()
    terminated_at = time.monotonic()
    second.process.send_signal(signal.SIGTERM)
    try:
        while alive(api_workers) and time.monotonic() - terminated_at < SHUTDOWN_BOUND_S - 5:
            time.sleep(0.2)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            runner.resume()
    took = wait_gone(second.tree, terminated_at, SHUTDOWN_BOUND_S)
    record = TaskStore(task_store_path(env["NEURONOVA_DATA_DIR"])).get(inflight_id)
    assert record.status == "failed" and record.error["details"] == {"reason": "server_shutdown"}, record
    print(f"shutdown: every process gone {took:.1f}s after SIGTERM")
