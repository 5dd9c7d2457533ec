"""Biomarker prediction: our served route against the plain Flask + XGBoost + TreeSHAP server (bench/plain_biomarker.py).

Run: `BENTOML_HOME=.bentoml-test .venv/bin/python bench/biomarker.py [--runs 3]` (needs the `bench` extra). Each run
starts our `bentoml serve` and then `gunicorn -w 2 bench.plain_biomarker:app`, alone in turn, both serving the same
stored model to the same synthetic patients with SHAP on, auth and rate limits off; prints per-run tables and the
ours / plain ratios (bench/versus.py); runs alternate which server goes first, and writes bench/results/biomarker.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import BENTOML_SERVE, serving  # noqa: E402
from bench.versus import compare, print_and_save  # noqa: E402
from core import store  # noqa: E402
from core.cards.tabular import TabularCard  # noqa: E402
from core.settings import get_settings  # noqa: E402
from training_export.synthetic_biomarker import generate_cohort  # noqa: E402

ROUTE = "/predict/biomarker_prediction"
SERVICE_ENV = {"NEURONOVA_AUTH__ENABLED": "false", "NEURONOVA_RATE_LIMIT__ENABLED": "false"}


def plain_config(path: Path) -> Path:
    """The plain server's settings, from the served model's card (same boosters, same feature encoding)."""
    model = store.get_model(get_settings().biomarker.model_tag)
    card = store.read_card(model, TabularCard)
    path.write_text(json.dumps({
        "version": str(model.tag),
        "features": [{"name": f.name, "type": f.type, "categories": getattr(f, "categories", None)} for f in card.features],
        "heads": [{"name": h.name, "classes": h.classes, "model_file": model.path_of(h.model_file)} for h in card.heads],
    }))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    records = itertools.cycle(generate_cohort(256, seed=2024).records)

    async def send(client):
        return await client.post(ROUTE, json={"patient_id": "P000001", "biomarkers": next(records), "xai": True})

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        plain_env = {"PLAIN_BIOMARKER_CONFIG": str(plain_config(scratch / "plain_biomarker.json"))}
        runs = [compare(lambda: serving(BENTOML_SERVE, SERVICE_ENV, scratch / "ours.log"), "bench.plain_biomarker:app",
                        plain_env, send, scratch, plain_first=run % 2 == 1) for run in range(args.runs)]
    print_and_save(runs, "biomarker")

if __name__ == "__main__":
    main()
