"""MRI segmentation benchmark: one BraTS-size case (4 x 240 x 240 x 155) through the served task (upload -> result,
without and with `uncertainty=true`) and, in the same run, in-process stage by stage: I/O and decoding,
preprocessing, raw sliding-window inference, post-processing (mask back in the input's geometry, clean-up,
measurements) and output writing, then what uncertainty adds (7 more mirrored passes, the map and its files).

Run: `.venv/bin/python bench/mri.py [--skip-http]`. Prints a Markdown table and writes bench/results/mri.json.
The load generator and server share this machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.mri import ModelOutput, build_result
from bench.harness import served
from core import store
from core.settings import get_settings
from postprocessing.masks import PostProcessingOptions
from preprocessing.volumes import decode_upload, prepare_volume
from runners.mri_model import load_segmenter_model
from training_export.synthetic_mri import synthetic_case

ROUTE = "/predict/mri_segmentation"
BRATS_SHAPE, BRATS_SPACING = (240, 240, 155), (1.0, 1.0, 1.0)


def brats_nifti(directory: Path) -> Path:
    """A synthetic BraTS-size case as one gzipped int16 4D NIfTI (volumes T1, T1ce, T2, FLAIR)."""
    case = synthetic_case(7, BRATS_SHAPE, BRATS_SPACING)
    path = directory / "brats_case.nii.gz"
    nib.save(nib.Nifti1Image(np.moveaxis(case.volume.data, 0, -1).astype(np.int16), case.volume.affine), path)
    return path


def stages_in_process(path: Path) -> dict[str, float]:
    """Seconds per stage for one case, calling the same functions the task body calls (runner in-process)."""
    settings = get_settings()
    model = load_segmenter_model(store.get_model(settings.mri.model_tag))
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    volume = decode_upload([(path.name, path.read_bytes())], model.card.input, settings.limits)
    seconds["io_decode"] = time.perf_counter() - started
    started = time.perf_counter()
    prepared = prepare_volume(volume, model.card.input, settings.limits.max_volume_voxels)
    seconds["preprocess"] = time.perf_counter() - started
    started = time.perf_counter()
    probabilities = model.segment(prepared.tensor, lambda *_: None)
    seconds["inference_sliding_window"] = time.perf_counter() - started
    marks: dict[str, float] = {}
    started = time.perf_counter()
    build_result(volume, prepared, ModelOutput(probabilities), model.card, PostProcessingOptions(), model.tag,
                 lambda step: marks.setdefault(step, time.perf_counter()))
    ended = time.perf_counter()
    seconds["postprocess"] = marks["writing_outputs"] - started
    seconds["outputs"] = ended - marks["writing_outputs"]
    started = time.perf_counter()
    passes = model.segment_passes(prepared.tensor, lambda *_: None)
    seconds["uncertainty: 8 mirrored passes, minus the plain one"] = time.perf_counter() - started - \
        seconds["inference_sliding_window"]
    started = time.perf_counter()
    build_result(volume, prepared, ModelOutput(passes[0], passes=passes), model.card, PostProcessingOptions(),
                 model.tag, lambda _: None)
    seconds["uncertainty: map, intervals, files"] = time.perf_counter() - started - \
        seconds["postprocess"] - seconds["outputs"]
    seconds["model_grid_voxels"] = float(np.prod(prepared.tensor.shape[1:]))
    return seconds


def served_task(path: Path) -> dict[str, float]:
    """Wall seconds of submit -> completed -> result fetched, against a real `bentoml serve` (auth off), without and
    then with uncertainty."""
    with tempfile.TemporaryDirectory(prefix="neuronova-bench-") as state:
        env = {"NEURONOVA_AUTH__ENABLED": "false", "NEURONOVA_RATE_LIMIT__ENABLED": "false",
               "NEURONOVA_DATA_DIR": str(Path(state) / "data"), "BENTOML_RESULT_STORE": str(Path(state) / "tasks.db")}
        with served(env, Path(state) / "server.log") as url, httpx.Client(base_url=url, timeout=600) as client:
            results = {}
            for suffix, uncertainty in (("", "false"), ("_uncertainty", "true")):
                started = time.perf_counter()
                with open(path, "rb") as upload:
                    task_id = client.post(f"{ROUTE}/submit", files={"image": (path.name, upload)},
                                          data={"patient_id": "P000001", "uncertainty": uncertainty}).json()["task_id"]
                submitted = time.perf_counter()
                while client.get(f"{ROUTE}/status", params={"task_id": task_id}).json()["status"] == "in_progress":
                    time.sleep(0.2)
                response = client.get(f"{ROUTE}/get", params={"task_id": task_id})
                ended = time.perf_counter()
                response.raise_for_status()
                results.update({f"end_to_end{suffix}": ended - started, f"upload_submit{suffix}": submitted - started,
                                f"result_bytes{suffix}": float(len(response.content))})
            return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-http", action="store_true", help="only the in-process stages")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="neuronova-bench-") as folder:
        path = brats_nifti(Path(folder))
        stages = stages_in_process(path)
        task = {} if args.skip_http else served_task(path)
        upload_mb = path.stat().st_size / 2**20
    plain = [k for k in stages if k != "model_grid_voxels" and not k.startswith("uncertainty")]
    in_process = sum(stages[k] for k in plain)
    rows = [(name, stages[name], 100.0 * stages[name] / in_process) for name in plain]
    print(f"BraTS-size case {BRATS_SHAPE} x 4 sequences, upload {upload_mb:.1f} MiB; model grid "
          f"{int(stages['model_grid_voxels'])} voxels; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print("| stage | seconds | share |\n|---|---|---|")
    for name, seconds, share in rows:
        print(f"| {name} | {seconds:.2f} | {share:.0f} % |")
    print(f"| in-process total | {in_process:.2f} | 100 % |")
    for name in (k for k in stages if k.startswith("uncertainty")):
        print(f"| added by {name} | {stages[name]:.2f} | {100.0 * stages[name] / in_process:.0f} % |")
    if task:
        print(f"| served task, upload -> result | {task['end_to_end']:.2f} | |")
        print(f"| served task with uncertainty=true | {task['end_to_end_uncertainty']:.2f} | |")
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / "mri.json").write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cuda": torch.cuda.is_available()},
        "upload_mib": upload_mb, "stages_s": stages, "in_process_total_s": in_process, "served_task_s": task,
    }, indent=2))


if __name__ == "__main__":
    main()
