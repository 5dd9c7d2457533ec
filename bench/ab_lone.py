"""Paired A/B of the lone-request path: this checkout against another one, both serving at once, requests alternating.

Run: `git worktree add /tmp/baseline <commit>`, then
`BENTOML_HOME=.bentoml-test .venv/bin/python bench/ab_lone.py --baseline /tmp/baseline [--requests 1500] [--route ct]`
(needs the `bench` extra). Serving changes worth a tenth of a millisecond drown in the drift of two shared cores
between separate runs (the same unchanged server: 2.8-3.3 ms from one run to the next); here each request of one
server is paired with one of the other, sent right before or after it in alternating order, so both see the same
machine. Prints each server's median latency and server CPU per request (all its processes, from /proc), and the
median of the paired differences. Biomarker route with SHAP on (default), or the CT route on held-out synthetic DICOM
slices (`--route ct`); auth and rate limits off; both servers read the same model store.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.biomarker import ROUTE, SERVICE_ENV  # noqa: E402
from bench.harness import BENTOML_SERVE, ROOT, Server, serving  # noqa: E402
from training_export.synthetic_biomarker import generate_cohort  # noqa: E402
from training_export.synthetic_ct import write_ct_dicom  # noqa: E402
from training_export.train_ct import heldout_set  # noqa: E402

WARM_UP = 300


def server_cpu_s(server: Server) -> float:
    """User + system CPU seconds of the server's whole process tree so far."""
    root = psutil.Process(server.pid)
    return sum(sum(process.cpu_times()[:2]) for process in [root, *root.children(recursive=True)])


def biomarker_sender() -> Callable[[httpx.Client, int], httpx.Response]:
    records = generate_cohort(256, seed=2024).records
    return lambda client, index: client.post(ROUTE, json={"patient_id": "P000001", "biomarkers": records[index % 256],
                                                          "xai": True})


def ct_sender() -> Callable[[httpx.Client, int], httpx.Response]:
    """Held-out synthetic slices as CT DICOM files (in distribution: the OOD and drift path as in production)."""
    slices = []
    with tempfile.TemporaryDirectory() as folder:
        for index, hu in enumerate(heldout_set(seed=3, n_per_class=8)[0]):
            write_ct_dicom(hu, Path(folder) / f"{index}.dcm")
            slices.append((Path(folder) / f"{index}.dcm").read_bytes())
    return lambda client, index: client.post("/predict/ct_classification", data={"patient_id": "P000001"},
                                             files={"image": ("slice.dcm", slices[index % len(slices)])})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", type=Path, required=True, help="the other checkout (e.g. a git worktree)")
    parser.add_argument("--requests", type=int, default=1500, help="lone requests to each server")
    parser.add_argument("--route", choices=("biomarker", "ct"), default="biomarker")
    args = parser.parse_args()
    send = ct_sender() if args.route == "ct" else biomarker_sender()

    def timed_post(client: httpx.Client, index: int) -> float:
        started = time.perf_counter()
        send(client, index).raise_for_status()
        return (time.perf_counter() - started) * 1000.0

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(serving(BENTOML_SERVE, SERVICE_ENV, Path(tmp) / f"{name}.log", cwd=cwd))
                   for name, cwd in (("baseline", args.baseline.resolve()), ("this", ROOT))}
        clients = {name: stack.enter_context(httpx.Client(base_url=server.url)) for name, server in servers.items()}
        latencies: dict[str, list[float]] = {name: [] for name in servers}
        for index in range(WARM_UP):
            for name in servers:
                timed_post(clients[name], index)
        cpu_before = {name: server_cpu_s(server) for name, server in servers.items()}
        for index in range(args.requests):
            for name in (("baseline", "this") if index % 2 else ("this", "baseline")):
                latencies[name].append(timed_post(clients[name], index))
        cpu = {name: (server_cpu_s(server) - cpu_before[name]) * 1000.0 / args.requests
               for name, server in servers.items()}
    for name in servers:
        print(f"{name}: p50 {statistics.median(latencies[name]):.3f} ms, server CPU {cpu[name]:.3f} ms per request")
    differences = [this - base for this, base in zip(latencies["this"], latencies["baseline"])]
    print(f"median paired difference (this - baseline): {statistics.median(differences):+.3f} ms; "
          f"p50 ratio this / baseline {statistics.median(latencies['this']) / statistics.median(latencies['baseline']):.3f}")


if __name__ == "__main__":
    main()
