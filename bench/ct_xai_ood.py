"""CT explanation cost (occlusion vs Grad-CAM, ms per image on CPU) and OOD-score separation on the served model.

Run: `BENTOML_HOME=.bentoml-test .venv/bin/python bench/ct_xai_ood.py [--tag neuronova-ct:latest]`. Prints Markdown
tables and writes bench/results/ct_xai_ood.json. In-process, one ONNX Runtime session, the CPU threads it finds.
In-distribution images are synthetic held-out slices: the threshold is calibrated on one held-out split (as training
or an import does) and its false-alarm rate measured on an independent one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import store
from core.errors import NeuroNovaError
from core.imaging import DecodedSlice, ImageSource
from core.ood import calibrate_ood, ood_scores
from preprocessing.decode import decode_slice
from preprocessing.transforms import prepare_slice
from runners.ct import LoadedClassifier, load_classifier
from training_export.train_ct import heldout_set, prepare_ct_batch
from xai.occlusion import DEFAULT_STEPS, occlusion_maps

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
"""pydicom's bundled test images: a chest CT, small MR, liver, ultrasound, colour test patterns, dose grids."""


def _display(pixels: np.ndarray) -> DecodedSlice:
    return DecodedSlice(pixels=pixels.astype(np.float32), intensity="display", source=ImageSource("png"))


def foreign_inputs(model: LoadedClassifier, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Prepared batches of images unlike the training data, by kind."""
    spec = model.card.input
    dicoms = {}  # by pixel content: pydicom ships one image in many transfer syntaxes
    for path in sorted(PYDICOM_FILES.glob("*.dcm")):
        try:  # any modality: the same pixels could be uploaded as PNG or JPEG, which carry none
            decoded = decode_slice(path.read_bytes(), path.name, max_pixels=2**26)
        except NeuroNovaError:  # not an image, or more than one frame
            continue
        tensor = prepare_slice(decoded, spec).tensor
        dicoms.setdefault(tensor.round(2).tobytes(), tensor)
    size = 256
    smooth = [np.kron(rng.random((8, 8, 3)), np.ones((32, 32, 1))) * 255 for _ in range(8)]
    return {
        "pydicom test images (distinct)": np.stack(list(dicoms.values())),
        "blank slices (black, grey, white)": np.stack(
            [prepare_slice(_display(np.full((size, size), v)), spec).tensor for v in (0.0, 128.0, 255.0)]
        ),
        "uniform noise": np.stack([prepare_slice(_display(rng.random((size, size)) * 255), spec).tensor for _ in range(8)]),
        "blocky colour 'photos'": np.stack([prepare_slice(_display(image), spec).tensor for image in smooth]),
    }


def separation(model: LoadedClassifier, n_per_class: int) -> dict[str, object]:
    """Flagged fraction per foreign kind and false alarms on independent in-distribution images; AUROC of the
    distance of the score from the interval's centre (a one-sided score cannot see over-confident inputs)."""
    calibration_images = prepare_ct_batch(heldout_set(0, n_per_class)[0], model.card.input)
    fresh_images = prepare_ct_batch(heldout_set(1, n_per_class)[0], model.card.input)
    score = model.card.ood.score if model.card.ood else None
    calibration = calibrate_ood(model.engine.run(calibration_images), model.card.output_kind, score=score)
    inside = ood_scores(model.engine.run(fresh_images), model.card.output_kind, score)
    rows: dict[str, object] = {
        "calibration": calibration.model_dump(),
        "in_distribution": {"n": len(inside), "flagged": float(np.mean([calibration.flags(s) for s in inside]))},
    }
    for kind, batch in foreign_inputs(model, np.random.default_rng(0)).items():
        outside = ood_scores(model.engine.run(batch), model.card.output_kind, score)
        truth = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
        distance = np.abs(np.r_[inside, outside] - (calibration.low + calibration.high) / 2)
        rows[kind] = {"n": len(outside), "auroc": round(float(roc_auc_score(truth, distance)), 3),
                      "flagged": float(np.mean([calibration.flags(s) for s in outside]))}
    return rows


def explanation_cost(model: LoadedClassifier, batch_size: int, repeat: int) -> dict[str, float]:
    """ms per explained image: occlusion (steps² passes through predict) and, with torch weights, Grad-CAM."""
    batch = prepare_ct_batch(heldout_set(2, 1)[0][:batch_size], model.card.input)
    methods = {"occlusion": lambda: occlusion_maps(model.predict, batch, model.card.input.layout)}
    if model.explainer is not None:
        methods["grad_cam"] = lambda: model.explain(batch)
    out = {"predict": _ms_per_image(lambda: model.predict(batch), len(batch), repeat)}
    out.update({name: _ms_per_image(run, len(batch), repeat) for name, run in methods.items()})
    return out


def _ms_per_image(run, images: int, repeat: int) -> float:
    run()
    started = time.perf_counter()
    for _ in range(repeat):
        run()
    return round((time.perf_counter() - started) * 1000.0 / (repeat * images), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tag", default="neuronova-ct:latest")
    parser.add_argument("--n-per-class", type=int, default=50)
    args = parser.parse_args()
    model = load_classifier(store.get_model(args.tag))
    results = {"tag": model.tag, "engine": model.engine.name, "occlusion_steps": DEFAULT_STEPS,
               "ms_per_image": explanation_cost(model, batch_size=4, repeat=3),
               "ood": separation(model, args.n_per_class)}
    print("| method | ms per image |\n|---|---|")
    for name, ms in results["ms_per_image"].items():
        print(f"| {name} | {ms} |")
    print("\n| inputs | n | AUROC vs in-distribution | flagged |\n|---|---|---|---|")
    for kind, row in results["ood"].items():
        if kind != "calibration":
            print(f"| {kind} | {row['n']} | {row.get('auroc', '—')} | {row['flagged']:.0%} |")
    out = Path(__file__).resolve().parent / "results" / "ct_xai_ood.json"
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
