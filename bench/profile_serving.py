"""Where the CPU goes while the CT or biomarker route is under load: py-spy on every server process at once.

Run: `BENTOML_HOME=.bentoml-test .venv/bin/python bench/profile_serving.py ct [--seconds 15]` (needs the `bench`
extra; py-spy needs ptrace rights, e.g. root). Starts `bentoml serve` (auth and rate limits off), drives 32 clients
(`--clients`) through the route, records each process with `py-spy record --format raw` for the same window, and prints, per
process, its CPU seconds in the window and its top functions by own time (share of that process's samples) and by
inclusive time (functions, not lines; frames present in nearly every sample, the event loop's, are left out), and
its CPU milliseconds per request served in the window. Raw profiles are kept in
bench/results/profile-<route>-<process>.txt.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.biomarker import ROUTE as BIOMARKER_ROUTE  # noqa: E402
from bench.ct import ROUTE as CT_ROUTE  # noqa: E402
from bench.ct import SERVICE_ENV, sample_dicom  # noqa: E402
from bench.harness import BENTOML_SERVE, run_load, serving  # noqa: E402
from bench.soak import role  # noqa: E402
from training_export.synthetic_biomarker import generate_cohort  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TOP = 30
EVERYWHERE = 0.9
"""Inclusive shares above this are the process's main loop, not a place the time goes."""


def summarise(raw: str) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(own, inclusive) shares of the top functions in a py-spy raw (collapsed stacks) profile."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_function(frame) for frame in stack.split(";")]
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    inclusive = collections.Counter({name: n for name, n in inclusive.items() if n < EVERYWHERE * total})
    share = lambda counter: [(name, n / total) for name, n in counter.most_common(TOP)]  # noqa: E731
    return share(own), share(inclusive)


def _function(frame: str) -> str:
    """`name (path/file.py:line)` -> `name (file.py)`."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1].split(':')[0]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("route", choices=["ct", "biomarker"])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (1: the lone-request path)")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.route == "ct":
            data = sample_dicom(Path(tmp))

            async def send(client):
                return await client.post(CT_ROUTE, files={"image": ("ct.dcm", data, "application/dicom")},
                                         data={"patient_id": "P000001", "xai": "false"})
        else:
            records = itertools.cycle(generate_cohort(256, seed=2024).records)

            async def send(client):
                return await client.post(BIOMARKER_ROUTE, json={"patient_id": "P000001", "biomarkers": next(records),
                                                               "xai": True})

        with serving(BENTOML_SERVE, SERVICE_ENV, Path(tmp) / "server.log") as server:
            run_load(send, server.url, 4, 32)
            stop = threading.Event()
            served = [0]

            async def counted(client):
                response = await send(client)
                served[0] += 1
                return response

            def load() -> None:
                while not stop.is_set():
                    run_load(counted, server.url, args.clients, args.clients * 64)  # long calls: each makes its clients anew

            driver = threading.Thread(target=load)
            driver.start()
            time.sleep(2)
            processes = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
            cpu_before = {p.pid: sum(p.cpu_times()[:2]) for p in processes}
            served_before = served[0]
            outputs = {p.pid: RESULTS / f"profile-{args.route}-{role(p).replace(':', '-')}.txt" for p in processes}
            py_spy = str(Path(sys.executable).parent / "py-spy")
            recorders = [subprocess.Popen([py_spy, "record", "--pid", str(p.pid), "--duration", str(args.seconds),
                                           "--rate", "200", "--format", "raw", "--nonblocking",
                                           "--output", str(outputs[p.pid])],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                         for p in processes]
            for recorder in recorders:
                recorder.wait()
            cpu = {p.pid: sum(p.cpu_times()[:2]) - cpu_before[p.pid] for p in processes}
            requests = served[0] - served_before
            stop.set()
            driver.join()
    print(f"{requests} requests completed in the window")
    for process in processes:
        path = outputs[process.pid]
        if not path.exists():
            continue
        own, inclusive = summarise(path.read_text())
        print(f"\n## {path.stem}: {cpu[process.pid]:.1f} CPU s, {cpu[process.pid] * 1000 / max(requests, 1):.1f} ms "
              "per request")
        print("own time: " + "; ".join(f"{name} {share:.0%}" for name, share in own))
        print("inclusive: " + "; ".join(f"{name} {share:.0%}" for name, share in inclusive))


if __name__ == "__main__":
    main()
