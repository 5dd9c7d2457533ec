"""Batching where it pays: a VGG16-size imported classifier served by our CT runner (adaptive batching) against the
plain one-request-at-a-time server (bench/plain_ct.py under `gunicorn -w 2`, batch 1), at 32 and 128 clients.

Run: `.venv/bin/python bench/vgg_batching.py` (needs the `bench` extra). Builds bench/vgg_occlusion.py's
Keras-style VGG16 (NHWC 240×240 RGB, softmax head, random seeded weights: timing does not depend on them), imports
it with `training_export.import_classifier` into a scratch copy of the model store (`BENTOML_HOME`: the other
runners need their demo models), and serves it as the CT model with ONNX
Runtime using every core (`NEURONOVA_CT__INTRA_OP_THREADS=0`), batches of up to 32 (`NEURONOVA_CT__MAX_BATCH_SIZE`) and a
120 s batching queue limit (a batch of 32 takes
seconds on a CPU). Both servers get the same 512×512 CT DICOM. Prints requests/s and p50/p99 per server and load.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch

SCRATCH = Path(tempfile.mkdtemp(prefix="neuronova-vgg-bench-"))
shutil.copytree(Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml")) / "models", SCRATCH / "bentoml" / "models")
os.environ["BENTOML_HOME"] = str(SCRATCH / "bentoml")  # a scratch copy of the model store, before bentoml is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ct import ROUTE, SERVICE_ENV, plain_config, sample_dicom  # noqa: E402
from bench.harness import BENTOML_SERVE, LoadResult, run_load, serving  # noqa: E402
from bench.versus import GUNICORN  # noqa: E402
from bench.vgg_occlusion import SIZE, KerasStyleVgg16  # noqa: E402
from core.cards.base import Provenance  # noqa: E402
from core.cards.classification import CT_CLASSES, ClassificationCard, ImageInputSpec  # noqa: E402
from training_export.onnx_export import export_onnx  # noqa: E402

CLIENTS = (32, 128)
NAME = "vgg16-bench"


def import_vgg(scratch: Path) -> str:
    """Export the VGG16-size model and import it as a classifier into the current model store; its tag."""
    from training_export.import_classifier import import_classifier

    torch.manual_seed(0)
    onnx = export_onnx(KerasStyleVgg16().eval(), torch.zeros(1, SIZE, SIZE, 3), scratch / "vgg16.onnx")
    card = ClassificationCard(
        name="VGG16-size benchmark model (random weights)", intended_use="benchmark only, not for clinical use",
        provenance=Provenance(source="bench/vgg_occlusion.py", synthetic_data=True), output_kind="probabilities",
        labels=list(CT_CLASSES), input=ImageInputSpec(height=SIZE, width=SIZE, channels=3, layout="NHWC"),
    )
    return import_classifier(onnx, card, name=NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests-per-client", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, dict[int, LoadResult]] = {"ours (batched)": {}, "plain (one at a time)": {}}
    try:
        scratch = SCRATCH
        tag = import_vgg(scratch)
        data = sample_dicom(scratch)

        async def send(client):
            return await client.post(ROUTE, files={"image": ("ct.dcm", data, "application/dicom")},
                                     data={"patient_id": "P000001", "xai": "false"})

        ours_env = {**SERVICE_ENV, "BENTOML_HOME": os.environ["BENTOML_HOME"], "NEURONOVA_CT__MODEL_TAG": tag,
                    "NEURONOVA_CT__INTRA_OP_THREADS": "0", "NEURONOVA_CT__MAX_BATCH_SIZE": "32",
                    "NEURONOVA_BATCH_MAX_LATENCY_MS": "120000"}
        plain_env = {"PLAIN_CT_CONFIG": str(plain_config(scratch / "plain.json", tag))}
        servers = {"ours (batched)": lambda: serving(BENTOML_SERVE, ours_env, scratch / "ours.log"),
                   "plain (one at a time)": lambda: serving([*GUNICORN, "--timeout", "600", "bench.plain_ct:app"],
                                                            plain_env, scratch / "plain.log", ready_path="/")}
        for name, start in servers.items():
            with start() as server:
                run_load(send, server.url, 2, 4)
                for clients in CLIENTS:
                    results[name][clients] = run_load(send, server.url, clients, clients * args.requests_per_client)
    finally:
        if (SCRATCH / "ours.log").exists():  # kept: the reason for any failed request is in it
            (Path(__file__).parent / "results").mkdir(exist_ok=True)
            shutil.copy(SCRATCH / "ours.log", Path(__file__).parent / "results" / "vgg-batching-server.log")
        shutil.rmtree(SCRATCH, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, CPU only\n")
    print("| server | clients | requests | errors | req/s | p50 ms | p99 ms |\n|---|---|---|---|---|---|---|")
    for name, by_clients in results.items():
        for clients, r in by_clients.items():
            print(f"| {name} | {clients} | {r.requests} | {r.errors} {r.failures or ''} | {r.throughput:.2f} | "
                  f"{r.p50_ms:.0f} | {r.p99_ms:.0f} |")
    for clients in CLIENTS:
        ratio = results["ours (batched)"][clients].throughput / results["plain (one at a time)"][clients].throughput
        print(f"batched / plain at {clients} clients: {ratio:.2f}x")


if __name__ == "__main__":
    main()
