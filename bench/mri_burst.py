"""A burst of BraTS-size MRI studies against one served instance (embedded mode, its default limits): how many are
taken (202) and refused (429 with Retry-After), whether every taken one completes, and the server's peak memory (the
resident set of the whole process tree, sampled every 0.2 s) against the Kubernetes memory limit (6 GiB,
deploy/k8s/deployment.yaml).

Run: `BENTOML_HOME=.bentoml-test .venv/bin/python bench/mri_burst.py [--studies 20] [--queue-max 16]`. Auth and rate
limits off; all submissions sent at once, one thread each.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import BENTOML_SERVE, serving  # noqa: E402
from bench.mri import ROUTE, brats_nifti  # noqa: E402
from training_export.demo import ensure_demo_models  # noqa: E402

MEMORY_LIMIT_GIB = 6.0
TIMEOUT_S = 1800.0


class PeakMemory:
    """Samples the resident set of a process and its children until stopped; `peak` in bytes."""

    def __init__(self, pid: int) -> None:
        self.root, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def resident(self) -> int:
        """The tree's resident set now, in bytes."""
        total = 0
        for process in [self.root, *self.root.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.resident())


def submit(client: httpx.Client, upload: bytes) -> httpx.Response:
    return client.post(f"{ROUTE}/submit", files={"image": ("brats_case.nii.gz", upload)},
                       data={"patient_id": "P000001"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--queue-max", type=int, default=None, help="NEURONOVA_LIMITS__MRI_QUEUE_MAX (default 16)")
    args = parser.parse_args()
    ensure_demo_models()
    with tempfile.TemporaryDirectory(prefix="neuronova-burst-") as state:
        upload = brats_nifti(Path(state)).read_bytes()
        env = {"NEURONOVA_AUTH__ENABLED": "false", "NEURONOVA_RATE_LIMIT__ENABLED": "false",
               "NEURONOVA_DATA_DIR": str(Path(state) / "data"), "BENTOML_RESULT_STORE": str(Path(state) / "tasks.db")}
        if args.queue_max is not None:
            env["NEURONOVA_LIMITS__MRI_QUEUE_MAX"] = str(args.queue_max)
        with serving(BENTOML_SERVE, env, Path(state) / "server.log") as server, \
                httpx.Client(base_url=server.url, timeout=600) as client, PeakMemory(server.pid) as memory:
            idle = memory.resident()
            started = time.monotonic()
            with ThreadPoolExecutor(args.studies) as pool:
                answers = list(pool.map(lambda _: submit(client, upload), range(args.studies)))
            taken = [a.json()["task_id"] for a in answers if a.status_code == 202 or a.status_code == 200]
            refused = [a for a in answers if a.status_code == 429]
            other = sorted({a.status_code for a in answers} - {200, 202, 429})
            states: dict[str, str] = {}
            while len(states) < len(taken) and time.monotonic() - started < TIMEOUT_S:
                for task_id in set(taken) - set(states):
                    status = client.get(f"{ROUTE}/status", params={"task_id": task_id}).json()["status"]
                    if status != "in_progress":
                        states[task_id] = status
                time.sleep(0.5)
            wall = time.monotonic() - started
    print(f"{args.studies} BraTS-size studies ({len(upload) / 2**20:.1f} MiB each) sent at once:")
    print(f"  taken {len(taken)}, refused 429 {len(refused)} (Retry-After "
          f"{sorted({a.headers.get('retry-after') for a in refused})}), other statuses {other}")
    print(f"  of the taken: {sum(s == 'completed' for s in states.values())} completed, "
          f"{sum(s == 'failed' for s in states.values())} failed, {len(taken) - len(states)} unfinished "
          f"after {wall:.0f} s")
    print(f"  server memory (RSS of the process tree): idle {idle / 2**30:.2f} GiB, peak {memory.peak / 2**30:.2f} GiB "
          f"(limit {MEMORY_LIMIT_GIB:.0f} GiB)")


if __name__ == "__main__":
    main()
