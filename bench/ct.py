"""CT classification: our served route against the plain Flask server of the original design (bench/plain_ct.py).

Run: `BENTOML_HOME=.bentoml-test .venv/bin/python bench/ct.py [--runs 3]` (needs the `bench` extra). Each run starts
our `bentoml serve` and then `gunicorn -w 2 bench.plain_ct:app`, alone in turn, both serving the same stored model
to the same 512×512 synthetic CT DICOM (525 KB), xai off, auth and rate limits off; prints per-run tables and the
ours / plain ratios (bench/versus.py); runs alternate which server goes first, and writes bench/results/ct.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import BENTOML_SERVE, serving  # noqa: E402
from bench.versus import compare, print_and_save  # noqa: E402
from core import store  # noqa: E402
from core.cards.classification import ClassificationCard  # noqa: E402
from core.settings import get_settings  # noqa: E402
from training_export.synthetic_ct import generate_ct_slice, write_ct_dicom  # noqa: E402

ROUTE = "/predict/ct_classification"
SERVICE_ENV = {"NEURONOVA_AUTH__ENABLED": "false", "NEURONOVA_RATE_LIMIT__ENABLED": "false"}


def sample_dicom(directory: Path) -> bytes:
    """A 512×512 synthetic CT slice with a glioma, as a DICOM file."""
    hu, _ = generate_ct_slice(np.random.default_rng(7), "Glioma", size=512)
    path = directory / "ct.dcm"
    write_ct_dicom(hu, path)
    return path.read_bytes()


def plain_config(path: Path, tag: str | None = None) -> Path:
    """The plain server's settings, from the served model's card (same file, window and scaling as ours)."""
    model = store.get_model(tag or get_settings().ct.model_tag)
    card = store.read_card(model, ClassificationCard)
    spec = card.input
    if len(set(spec.mean)) != 1 or len(set(spec.std)) != 1:
        raise SystemExit("the plain baseline serves models with one mean/std only")
    scale, shift = {"unit": (1.0, 0.0), "symmetric": (2.0, -1.0),
                    "mean_std": (1.0 / spec.std[0], -spec.mean[0] / spec.std[0])}[spec.scaling]
    path.write_text(json.dumps({
        "onnx": model.path_of(card.model_file), "version": str(model.tag), "labels": card.contract_labels(),
        "hu_clip": list(spec.hu_clip or (-1e9, 1e9)), "window": [spec.ct_window.center, spec.ct_window.width],
        "height": spec.height, "width": spec.width, "channels": spec.channels, "layout": spec.layout,
        "output_kind": card.output_kind, "scale": scale, "shift": shift,
    }))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        data = sample_dicom(scratch)
        plain_env = {"PLAIN_CT_CONFIG": str(plain_config(scratch / "plain_ct.json"))}

        async def send(client):
            return await client.post(ROUTE, files={"image": ("ct.dcm", data, "application/dicom")},
                                     data={"patient_id": "P000001", "xai": "false"})

        runs = [compare(lambda: serving(BENTOML_SERVE, SERVICE_ENV, scratch / "ours.log"), "bench.plain_ct:app",
                        plain_env, send, scratch, plain_first=run % 2 == 1) for run in range(args.runs)]
    print_and_save(runs, "ct")

if __name__ == "__main__":
    main()
