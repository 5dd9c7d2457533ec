"""CT classification benchmark: the served route vs the raw ONNX model in-process, batched vs batching off.

Run: `make bench` (or `.venv/bin/python bench/ct.py [--requests N]`). Prints a Markdown table and writes
bench/results/ct.json. Everything runs on this machine: the load generator shares its cores with the server.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import LoadResult, percentile, run_load, served, timed  # noqa: E402
from core import store  # noqa: E402
from core.cards.classification import ClassificationCard  # noqa: E402
from core.settings import get_settings  # noqa: E402
from preprocessing.decode import decode_slice  # noqa: E402
from preprocessing.transforms import prepare_slice  # noqa: E402
from runners.common import onnx_session  # noqa: E402
from training_export.synthetic_ct import generate_ct_slice, write_ct_dicom  # noqa: E402

CLIENTS = (1, 8, 32)
ROUTE = "/predict/ct_classification"


def sample_dicom(directory: Path) -> bytes:
    """A 512×512 synthetic CT slice with a glioma, as a DICOM file."""
    hu, _ = generate_ct_slice(np.random.default_rng(7), "Glioma", size=512)
    path = directory / "ct.dcm"
    write_ct_dicom(hu, path)
    return path.read_bytes()


def raw_model(data: bytes, repeat: int) -> dict[str, dict[str, float]]:
    """ONNX Runtime in-process on the same preprocessed input at batch 1, 8 and 32 (plus decode+prepare time)."""
    model = store.get_model(get_settings().ct.model_tag)
    card = store.read_card(model, ClassificationCard)
    session, engine = onnx_session(model.path_of(card.model_file))
    name = session.get_inputs()[0].name
    prepare_ms = timed(lambda: prepare_slice(decode_slice(data, max_pixels=2**26, modalities=card.input.modalities), card.input), repeat)
    tensor = prepare_slice(decode_slice(data, max_pixels=2**26), card.input).tensor
    out: dict[str, dict[str, float]] = {"decode_prepare": {"p50_ms": percentile(prepare_ms, 50)}}
    for batch_size in CLIENTS:
        batch = np.repeat(tensor[None], batch_size, axis=0)
        ms = timed(lambda: session.run(None, {name: batch}), max(3, repeat // batch_size))
        out[f"batch_{batch_size}"] = {"p50_ms": percentile(ms, 50), "images_per_s": batch_size * 1000.0 / percentile(ms, 50)}
    out["engine"] = {"name": engine}  # type: ignore[assignment]
    return out


def service_load(url: str, data: bytes, xai: bool, clients: int, requests: int, headers: dict[str, str]) -> LoadResult:
    form = {"patient_id": "P000001", "xai": "true" if xai else "false"}

    async def send(client):
        return await client.post(ROUTE, files={"image": ("ct.dcm", data, "application/dicom")}, data=form)

    return run_load(send, url, clients, requests, headers)


def row(label: str, result: LoadResult) -> str:
    return (f"| {label} | {result.clients} | {result.requests} | {result.errors} | {result.p50_ms:.1f} | "
            f"{result.p95_ms:.1f} | {result.throughput:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=256, help="requests per load level")
    args = parser.parse_args()
    results: dict[str, object] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"}
    with tempfile.TemporaryDirectory() as tmp:
        data = sample_dicom(Path(tmp))
        results["raw"] = raw = raw_model(data, repeat=64)
        table = ["| setting | clients | requests | errors | p50 ms | p95 ms | req/s |", "|---|---|---|---|---|---|---|"]
        env = {"NEURONOVA_AUTH__ENABLED": "false", "NEURONOVA_RATE_LIMIT__ENABLED": "false"}
        loads: dict[str, dict] = {}
        with served(env, Path(tmp) / "batched.log") as url:
            for xai in (False, True):
                for clients in CLIENTS:
                    n = args.requests if not xai else max(clients * 2, args.requests // 4)
                    result = service_load(url, data, xai, clients, n, {})
                    label = f"service, batching on, xai={'on' if xai else 'off'}"
                    table.append(row(label, result))
                    loads[f"batched_xai{int(xai)}_c{clients}"] = result.__dict__ | {"throughput": result.throughput}
        with served({**env, "NEURONOVA_CT_ADAPTIVE_BATCHING": "false"}, Path(tmp) / "unbatched.log") as url:
            for clients in (1, 32):
                result = service_load(url, data, False, clients, args.requests, {})
                table.append(row("service, batching off, xai=off", result))
                loads[f"unbatched_xai0_c{clients}"] = result.__dict__ | {"throughput": result.throughput}
        results["service"] = loads
    best_raw = raw["batch_32"]["images_per_s"]
    raw_pipeline = 1000.0 / (raw["decode_prepare"]["p50_ms"] + raw["batch_1"]["p50_ms"])
    ratios = {
        "service_c32_vs_raw_decode_prepare_predict": loads["batched_xai0_c32"]["throughput"] / raw_pipeline,
        "service_c32_vs_raw_batch32": loads["batched_xai0_c32"]["throughput"] / best_raw,
        "service_c32_vs_raw_batch1": loads["batched_xai0_c32"]["throughput"] / raw["batch_1"]["images_per_s"],
        "batched_vs_unbatched_c32": loads["batched_xai0_c32"]["throughput"] / loads["unbatched_xai0_c32"]["throughput"],
        "batched_c32_vs_one_at_a_time": loads["batched_xai0_c32"]["throughput"] / loads["unbatched_xai0_c1"]["throughput"],
    }
    results["ratios"] = ratios
    print(f"machine: {results['machine']}; engine: {raw['engine']['name']}")
    print(f"raw decode+prepare p50: {raw['decode_prepare']['p50_ms']:.1f} ms")
    for batch_size in CLIENTS:
        print(f"raw ONNX batch {batch_size}: p50 {raw[f'batch_{batch_size}']['p50_ms']:.1f} ms, "
              f"{raw[f'batch_{batch_size}']['images_per_s']:.1f} images/s")
    print("\n".join(table))
    print(json.dumps(ratios, indent=2))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "ct.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
