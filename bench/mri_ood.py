"""How the MRI out-of-distribution check and the uncertainty map do on the served model (ONNX Runtime, in-process):
held-out synthetic cases (seeds never used in training or calibration) against foreign studies
(training_export.foreign_volumes).

Prints, per descriptor and for the Mahalanobis distance the card calibrates, the AUROC of "foreign" vs held-out
(a descriptor alone is scored by its distance from the calibration mean in calibration standard deviations), the
held-out false-alarm rate, each foreign study's distance and verdict, and the held-out Dice, uncertainty AUROC and
volume-interval coverage. Run: `.venv/bin/python bench/mri_ood.py [--cases 40]`; writes bench/results/mri_ood.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.mri import check_ood
from core import store
from core.settings import get_settings
from core.volume_ood import volume_descriptors, voxel_ml
from preprocessing.volumes import decode_upload, prepare_volume
from runners.mri_model import LoadedSegmenter, load_segmenter_model
from training_export.foreign_volumes import foreign_studies
from training_export.train_mri import heldout_metrics, prepare_case, run_cases

BENCH_SEED_OFFSET = 300_000
HELDOUT_GRID = ((96, 96, 72), (2.0, 2.0, 2.0))


def foreign_rows(model: LoadedSegmenter) -> list[dict]:
    """Each foreign study decoded and prepared as the service does: its descriptors and OOD verdict (or refusal)."""
    settings, rows = get_settings(), []
    for study in foreign_studies(model.card.input.sequences):
        try:
            volume = decode_upload(study.uploads, model.card.input, settings.limits, study.sequence_types)
            prepared = prepare_volume(volume, model.card.input, settings.limits.max_volume_voxels)
        except Exception as exc:  # noqa: BLE001 - a refusal is an outcome here
            rows.append({"study": study.name, "refused": type(exc).__name__})
            continue
        probabilities = model.segment(prepared.tensor, lambda *_: None)
        checked = check_ood(prepared, probabilities, model.card)
        descriptors = volume_descriptors(prepared.tensor, probabilities, voxel_ml(prepared.affine))
        rows.append({"study": study.name, "descriptors": descriptors,
                     "distance": checked.distance, "flagged": checked.flagged,
                     "tumour_voxels": int((probabilities.argmax(0) > 0).sum())})
    return rows


def auroc_table(model: LoadedSegmenter, heldout: list, foreign: list[dict]) -> dict[str, float]:
    """AUROC (foreign = positive) of each descriptor alone and of the calibrated distance."""
    ood = model.card.ood
    scored = [row for row in foreign if "descriptors" in row]
    covariance_diag = np.sqrt(np.diag(np.linalg.inv(np.asarray(ood.precision))))
    labels = [0] * len(heldout) + [1] * len(scored)
    table = {}
    for index, name in enumerate(ood.descriptors):
        def single(row: np.ndarray | None) -> float:
            return np.inf if row is None else abs(row[index] - ood.mean[index]) / covariance_diag[index]
        scores = [single(o.descriptors) for o in heldout] + [single(r["descriptors"]) for r in scored]
        table[name] = roc_auc_score(labels, np.nan_to_num(scores, posinf=1e12))
    distances = [ood.distance(o.descriptors) for o in heldout] + [ood.distance(r["descriptors"]) for r in scored]
    table["mahalanobis (used)"] = roc_auc_score(labels, np.nan_to_num(distances, posinf=1e12))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40, help="held-out synthetic cases (default 40)")
    args = parser.parse_args()
    model = load_segmenter_model(store.get_model(get_settings().mri.model_tag))
    cases = [prepare_case(BENCH_SEED_OFFSET + i, HELDOUT_GRID, model.card) for i in range(args.cases)]
    heldout = run_cases(lambda volume, _: model.segment(volume, lambda *_: None), cases, model.card)
    metrics = heldout_metrics(heldout, model.card.ood, model.card.volume_interval)
    foreign = foreign_rows(model)
    aurocs = auroc_table(model, heldout, foreign)
    print(f"model {model.tag}; {len(cases)} held-out synthetic cases; {os.cpu_count()} CPUs")
    print("| held-out metric | value |\n|---|---|")
    for name, value in metrics.items():
        print(f"| {name} | {value:.3f} |")
    print("\n| OOD score | AUROC foreign vs held-out |\n|---|---|")
    for name, value in aurocs.items():
        print(f"| {name} | {value:.3f} |")
    print(f"\nthreshold {model.card.ood.threshold:.2f}")
    print("| foreign study | distance | warned | tumour voxels |\n|---|---|---|---|")
    for row in foreign:
        if "refused" in row:
            print(f"| {row['study']} | refused ({row['refused']}) | | |")
        else:
            distance = "no signal" if row["distance"] is None else f"{row['distance']:.1f}"
            print(f"| {row['study']} | {distance} | {'yes' if row['flagged'] else '**no**'} | {row['tumour_voxels']} |")
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / "mri_ood.json").write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "model": model.tag,
        "heldout_metrics": metrics, "auroc": aurocs,
        "foreign": [{k: v for k, v in row.items() if k != "descriptors"} for row in foreign],
    }, indent=2))


if __name__ == "__main__":
    main()
