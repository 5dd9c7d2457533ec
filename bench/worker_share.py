"""How the API workers of one replica share the work, for three client shapes (issue #29).

Shapes, each for `--seconds`, against one `bentoml serve` (auth and rate limits off), CT slices of 512×512 (DICOM):
- `separate`: `--clients` CT senders, each with a connection of its own (as bench/ct.py);
- `pooled`: the same senders through one pooled keep-alive `httpx` client of `--pool` connections (as a Django
  backend holds one);
- `pooled+mri`: that pooled client carrying one MRI submitter (a small NIfTI case, polled until done, again and
  again) and `--clients` − 1 CT senders.
Reports per shape: CT requests per second, MRI tasks done, and each API worker's share of the API workers' CPU time
(read from /proc before and after). Run: `BENTOML_HOME=.bentoml-test .venv/bin/python bench/worker_share.py
[--api-workers 1] [--checkout PATH]` (`--checkout` serves another checkout, e.g. a `git worktree` of an earlier
commit); writes bench/results/worker_share-<api workers>w.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ct import ROUTE as CT, SERVICE_ENV, sample_dicom  # noqa: E402
from bench.harness import BENTOML_SERVE, ROOT, SERVER_TAG, serving, tagged_processes  # noqa: E402
from bench.soak import role  # noqa: E402
from training_export.synthetic_mri import synthetic_case  # noqa: E402

MRI = "/predict/mri_segmentation"
POLL_S = 0.5


def api_workers(tag: str) -> list[psutil.Process]:
    return sorted((p for p in tagged_processes(SERVER_TAG, tag) if role(p).startswith("neuronova:")), key=role)


def cpu_seconds(processes: list[psutil.Process]) -> dict[str, float]:
    out = {}
    for process in processes:
        times = process.cpu_times()
        out[role(process)] = times.user + times.system
    return out


def small_mri_case() -> bytes:
    case = synthetic_case(5, (64, 64, 40), (3.0, 3.0, 3.0))
    volume = nib.Nifti1Image(np.moveaxis(case.volume.data, 0, -1).astype(np.int16), case.volume.affine)
    return gzip.compress(volume.to_bytes(), compresslevel=1)


async def ct_sender(client: httpx.AsyncClient, dicom: bytes, deadline: float, counts: dict[str, int]) -> None:
    while time.monotonic() < deadline:
        response = await client.post(CT, files={"image": ("ct.dcm", dicom, "application/dicom")},
                                     data={"patient_id": "P000001", "xai": "false"})
        counts["ct" if response.status_code == 200 else "errors"] += 1


async def mri_task(client: httpx.AsyncClient, case: bytes) -> str:
    """Submit the case and poll until the task ends; its final status ('refused' when not accepted)."""
    submitted = await client.post(f"{MRI}/submit", files={"image": ("case.nii.gz", case)},
                                  data={"patient_id": "P000002"})
    if submitted.status_code != 200:
        return "refused"
    task_id = submitted.json()["task_id"]
    while True:
        status = (await client.get(f"{MRI}/status", params={"task_id": task_id})).json()["status"]
        if status in ("completed", "failed", "cancelled"):
            return status
        await asyncio.sleep(POLL_S)


async def mri_submitter(client: httpx.AsyncClient, case: bytes, deadline: float, counts: dict[str, int]) -> None:
    while time.monotonic() < deadline:
        counts["mri" if await mri_task(client, case) == "completed" else "errors"] += 1


async def run_shape(shape: str, url: str, clients: int, pool: int, seconds: float, dicom: bytes,
                    case: bytes) -> dict[str, int]:
    counts = {"ct": 0, "mri": 0, "errors": 0}
    deadline = time.monotonic() + seconds
    jobs: list[Callable[[httpx.AsyncClient], Awaitable[None]]]
    if shape == "separate":
        async with asyncio.TaskGroup() as group:
            for _ in range(clients):
                client = httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=1))
                group.create_task(_with(client, lambda c: ct_sender(c, dicom, deadline, counts)))
        return counts
    jobs = [lambda c: ct_sender(c, dicom, deadline, counts) for _ in range(clients - (shape == "pooled+mri"))]
    if shape == "pooled+mri":
        jobs.append(lambda c: mri_submitter(c, case, deadline, counts))
    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        await asyncio.gather(*(job(client) for job in jobs))
    return counts


async def _with(client: httpx.AsyncClient, job: Callable[[httpx.AsyncClient], Awaitable[None]]) -> None:
    async with client:
        await job(client)


async def warm_up(url: str, dicom: bytes, case: bytes) -> None:
    """Load the models and the first-request paths (the MRI pipeline: torch and MONAI) before any shape is timed."""
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        for _ in range(4):
            await client.post(CT, files={"image": ("ct.dcm", dicom, "application/dicom")}, data={"patient_id": "P1"})
        status = await mri_task(client, case)
    if status != "completed":
        raise SystemExit(f"the warm-up MRI task ended {status}")


def measure(shape: str, url: str, tag: str, args: argparse.Namespace, dicom: bytes, case: bytes) -> dict:
    workers = api_workers(tag)
    before = cpu_seconds(workers)
    started = time.monotonic()
    counts = asyncio.run(run_shape(shape, url, args.clients, args.pool, args.seconds, dicom, case))
    wall = time.monotonic() - started
    used = {name: seconds - before[name] for name, seconds in cpu_seconds(workers).items()}
    total = sum(used.values()) or 1.0
    return {"shape": shape, "ct_per_s": counts["ct"] / wall, "mri_done": counts["mri"], "errors": counts["errors"],
            "api_cpu_s": {name: round(value, 2) for name, value in used.items()},
            "api_cpu_share": {name: round(value / total, 3) for name, value in used.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--pool", type=int, default=10)
    parser.add_argument("--api-workers", type=int, default=2)
    parser.add_argument("--checkout", type=Path, default=ROOT)
    parser.add_argument("--shapes", default="separate,pooled,pooled+mri")
    args = parser.parse_args()
    env = {**SERVICE_ENV, "BENTOML_CONFIG_OPTIONS": f"services.neuronova.workers={args.api_workers}"}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        env["NEURONOVA_DATA_DIR"] = str(scratch / "data")
        dicom, case = sample_dicom(scratch), small_mri_case()
        with serving(BENTOML_SERVE, env, scratch / "server.log", cwd=args.checkout.resolve()) as server:
            tag = psutil.Process(server.pid).environ()[SERVER_TAG]
            asyncio.run(warm_up(server.url, dicom, case))
            for shape in args.shapes.split(","):
                result = measure(shape, server.url, tag, args, dicom, case)
                print(json.dumps(result))
                results.append(result)
    out = ROOT / "bench" / "results" / f"worker_share-{args.api_workers}w.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(), "checkout": str(args.checkout),
                               "args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
