"""Soak: mixed CT / biomarker / MRI load on loopback for a bounded time, against a real `bentoml serve`.

Reports requests served, errors (every request is valid, so any non-200 or failed task is an error), p50/p99
latency per route, and the resident memory of every server process (arbiter, API workers, runners) after warm-up
and at the end. Run: `nice .venv/bin/python bench/soak.py [--minutes 10] [--clients 8]`; writes
bench/results/soak.json and keeps the server's log in bench/results/soak-server.log. The load generator shares this
machine's cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import io
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import percentile, served
from training_export.synthetic_biomarker import generate_cohort
from training_export.synthetic_ct import generate_ct_slice, write_ct_dicom
from training_export.synthetic_mri import synthetic_case

CT, BIOMARKER, MRI = "/predict/ct_classification", "/predict/biomarker_prediction", "/predict/mri_segmentation"
WARM_UP_S = 60.0
"""Memory is compared from the end of the warm-up (models loaded, caches and arenas at working size)."""
SAMPLE_EVERY_S = 10.0
MRI_POLL_S = 0.5
SERVER_LOG = Path(__file__).parent / "results" / "soak-server.log"
"""Kept after the run (JSON access lines and BentoML's log): the traceback of any error is there."""


def server_tree(url: str) -> list[psutil.Process]:
    """The served process tree (arbiter first), found from the process listening on the URL's port."""
    port = int(url.rsplit(":", 1)[1])
    listener = next(c.pid for c in psutil.net_connections("tcp")
                    if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid)
    root = psutil.Process(listener)
    while root.parent() is not None and "bentoml" in " ".join(root.parent().cmdline()):
        root = root.parent()
    return [root, *root.children(recursive=True)]


def role(process: psutil.Process) -> str:
    """`<service>:<worker id>` from a BentoML worker's command line, `arbiter` for `bentoml serve` itself."""
    try:
        args = process.cmdline()
    except psutil.NoSuchProcess:
        return f"gone:{process.pid}"
    if "--service-name" not in args:
        return "arbiter" if "serve" in args else f"other:{process.pid}"
    worker = args[args.index("--worker-id") + 1] if "--worker-id" in args else "1"
    return f"{args[args.index('--service-name') + 1]}:{worker}"


def rss_by_role(url: str) -> dict[str, float]:
    """MiB resident per server process, keyed by role."""
    out: dict[str, float] = {}
    for process in server_tree(url):
        try:
            out[role(process)] = process.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            continue
    return out


def inputs(directory: Path) -> dict[str, object]:
    """The valid requests the soak cycles through: CT DICOM and PNG slices, biomarker records, one small MRI case."""
    rng = np.random.default_rng(11)
    ct_files = []
    for i, label in enumerate(("Glioma", "Meningioma", "Pituitary", "No Tumor")):
        hu, _ = generate_ct_slice(rng, label, size=512)
        write_ct_dicom(hu, directory / f"ct{i}.dcm")
        ct_files.append((f"ct{i}.dcm", (directory / f"ct{i}.dcm").read_bytes()))
        png = io.BytesIO()
        Image.fromarray(np.clip((hu + 100) / 400 * 255, 0, 255).astype(np.uint8)).save(png, format="PNG")
        ct_files.append((f"ct{i}.png", png.getvalue()))
    case = synthetic_case(5, (96, 96, 64), (2.0, 2.0, 2.0))
    volume = nib.Nifti1Image(np.moveaxis(case.volume.data, 0, -1).astype(np.int16), case.volume.affine)
    return {"ct": ct_files, "biomarker": generate_cohort(128, seed=99).records,
            "mri": gzip.compress(volume.to_bytes(), compresslevel=1)}


class Tally:
    """Latencies and errors per route."""

    def __init__(self) -> None:
        self.ms: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, list[str]] = defaultdict(list)

    def add(self, route: str, started: float, error: str | None) -> None:
        self.ms[route].append((time.perf_counter() - started) * 1000.0)
        if error is not None:
            self.errors[route].append(error)

    def summary(self) -> dict[str, dict[str, float]]:
        return {route: {"requests": len(ms), "errors": len(self.errors[route]), "p50_ms": percentile(ms, 50),
                        "p99_ms": percentile(ms, 99), "max_ms": max(ms)} for route, ms in sorted(self.ms.items())}


def _status_error(response: httpx.Response) -> str | None:
    return None if response.status_code == 200 else f"{response.status_code}: {response.text[:200]}"


async def image_client(client: httpx.AsyncClient, data: dict, deadline: float, tally: Tally, offset: int) -> None:
    """Alternates CT (Grad-CAM on every 10th) and biomarker (SHAP on every 5th) requests until the deadline."""
    ct_cycle = itertools.cycle(data["ct"][offset % len(data["ct"]):] + data["ct"][:offset % len(data["ct"])])
    records = itertools.cycle(data["biomarker"][offset:] + data["biomarker"][:offset])
    for n in itertools.count(offset):
        if time.monotonic() > deadline:
            return
        started = time.perf_counter()
        try:
            if n % 2:
                name, payload = next(ct_cycle)
                response = await client.post(CT, files={"image": (name, payload)},
                                             data={"patient_id": "P000001", "xai": str(n % 10 == 1).lower()})
                tally.add(CT, started, _status_error(response))
            else:
                body = {"patient_id": "P000002", "biomarkers": next(records), "xai": n % 5 == 0}
                tally.add(BIOMARKER, started, _status_error(await client.post(BIOMARKER, json=body)))
        except httpx.TransportError as exc:
            tally.add(CT if n % 2 else BIOMARKER, started, f"transport: {type(exc).__name__}")


async def mri_client(client: httpx.AsyncClient, data: dict, deadline: float, tally: Tally) -> None:
    """Submits the MRI case, polls until it finishes, fetches the result; again until the deadline."""
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            submitted = await client.post(f"{MRI}/submit", files={"image": ("case.nii.gz", data["mri"])},
                                          data={"patient_id": "P000003"})
            if submitted.status_code != 200:
                tally.add(MRI, started, _status_error(submitted))
                continue
            task_id = submitted.json()["task_id"]
            while (await client.get(f"{MRI}/status", params={"task_id": task_id})).json()["status"] == "in_progress":
                await asyncio.sleep(MRI_POLL_S)
            result = await client.get(f"{MRI}/get", params={"task_id": task_id})
            tally.add(MRI, started, _status_error(result))
        except httpx.TransportError as exc:
            tally.add(MRI, started, f"transport: {type(exc).__name__}")


async def sample_memory(url: str, deadline: float, samples: list[tuple[float, dict[str, float]]]) -> None:
    started = time.monotonic()
    while time.monotonic() < deadline:
        samples.append((time.monotonic() - started, rss_by_role(url)))
        await asyncio.sleep(SAMPLE_EVERY_S)
    samples.append((time.monotonic() - started, rss_by_role(url)))


async def soak(url: str, data: dict, seconds: float, clients: int) -> tuple[Tally, list[tuple[float, dict[str, float]]]]:
    tally, samples = Tally(), []
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=clients + 2)) as client:
        await asyncio.gather(
            mri_client(client, data, deadline, tally),
            *(image_client(client, data, deadline, tally, offset) for offset in range(clients - 1)),
            sample_memory(url, deadline, samples),
        )
    return tally, samples


def memory_report(samples: list[tuple[float, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per process: MiB after warm-up, at the end, the peak, and the growth from warm-up to the end."""
    warm = next((rss for t, rss in samples if t >= WARM_UP_S), samples[0][1])
    end = samples[-1][1]
    report = {}
    for name in sorted(end):
        peak = max(rss.get(name, 0.0) for _, rss in samples)
        start = warm.get(name, end[name])
        report[name] = {"after_warm_up_mib": start, "end_mib": end[name], "peak_mib": peak,
                        "growth_mib": end[name] - start, "growth_pct": 100.0 * (end[name] - start) / start}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (one of them submits MRI tasks)")
    args = parser.parse_args()
    SERVER_LOG.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="neuronova-soak-") as folder:
        state = Path(folder)
        data = inputs(state)
        env = {"NEURONOVA_AUTH__ENABLED": "false", "NEURONOVA_RATE_LIMIT__ENABLED": "false",
               "NEURONOVA_DATA_DIR": str(state / "data"), "BENTOML_RESULT_STORE": str(state / "tasks.db")}
        with served(env, SERVER_LOG) as url:
            started = time.perf_counter()
            tally, samples = asyncio.run(soak(url, data, args.minutes * 60.0, args.clients))
            wall = time.perf_counter() - started
    routes, memory = tally.summary(), memory_report(samples)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
               "minutes": args.minutes, "clients": args.clients, "wall_s": wall, "routes": routes, "memory": memory,
               "error_samples": {route: errors[:5] for route, errors in tally.errors.items()},
               "rss_timeline_mib": [{"t_s": round(t), **{k: round(v, 1) for k, v in rss.items()}} for t, rss in samples]}
    print(f"{results['machine']}; {args.clients} clients for {wall:.0f} s")
    print("| route | requests | errors | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|")
    for route, r in routes.items():
        print(f"| {route} | {r['requests']} | {r['errors']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['max_ms']:.0f} |")
    print("\n| process | RSS after warm-up MiB | end MiB | peak MiB | growth MiB | growth % |\n|---|---|---|---|---|---|")
    for name, m in memory.items():
        print(f"| {name} | {m['after_warm_up_mib']:.0f} | {m['end_mib']:.0f} | {m['peak_mib']:.0f} | "
              f"{m['growth_mib']:+.0f} | {m['growth_pct']:+.1f} |")
    names = sorted(memory)
    print(f"\nRSS MiB per minute\n| t s | {' | '.join(names)} |\n|---|{'---|' * len(names)}")
    for row in results["rss_timeline_mib"][:: max(1, round(60 / SAMPLE_EVERY_S))]:
        print(f"| {row['t_s']} | {' | '.join(f'{row.get(n, 0):.0f}' for n in names)} |")
    (SERVER_LOG.parent / "soak.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
