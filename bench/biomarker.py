"""Biomarker prediction benchmark: the served route (with and without SHAP, 1 and 32 clients) beside the raw model
in-process (encode + XGBoost, with and without exact TreeSHAP), in the same run, on the same synthetic patients.

Run: `.venv/bin/python bench/biomarker.py [--requests N]` (the demo models must be in the store: `make models`).
Prints a Markdown table. Everything runs on this machine: the load generator shares its cores with the server.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import re
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import LoadResult, percentile, run_load, served, timed  # noqa: E402
from core import store  # noqa: E402
from core.settings import get_settings  # noqa: E402
from preprocessing.tabular import encode_request, stack_rows  # noqa: E402
from runners.biomarker import load_tabular  # noqa: E402
from training_export.synthetic_biomarker import generate_cohort  # noqa: E402
from xai.shap_plots import shap_explanation  # noqa: E402

ROUTE = "/predict/biomarker_prediction"
WARM_UP_REQUESTS = 20
TRANSPORT_ERROR = 599
"""Status recorded for a request whose connection failed, so that it counts as an error instead of ending the run."""
PHASES = ((1, False, ""), (1, True, ""), (32, False, ""), (32, True, ""), (1, True, ", right after the 32-client run"))
"""(clients, xai, note). The last phase shows BentoML's adaptive batching still waiting for company it learned to
expect under load: the dispatcher's learned wait decays over tens of seconds."""


def raw_model(records: list[dict], repeat: int) -> list[tuple[str, float, float, float]]:
    """(label, p50 ms, p95 ms, rows/s) of the model in-process: one record at a time, and a batch of 32."""
    model = load_tabular(store.get_model(get_settings().biomarker.model_tag))
    card, names = model.card, model.card.feature_names()
    cycle = itertools.cycle(records)

    def predict_one() -> None:
        record = encode_request(next(cycle), card)
        card.read_heads(model.predict(record.row[None])[0])

    def explain_one(plots: bool = False) -> None:
        record = encode_request(next(cycle), card)
        shap_explanation(card.read_heads(model.explain(record.row[None])[0]), record.values, names, plots)

    batch = stack_rows([encode_request(r, card) for r in records[:32]])
    cases = [
        ("raw: encode + predict, 1 row", timed(predict_one, repeat), 1),
        ("raw: encode + predict + TreeSHAP, 1 row", timed(explain_one, repeat), 1),
        ("raw: encode + predict + TreeSHAP + 2 plots, 1 row", timed(lambda: explain_one(plots=True), 10), 1),
        ("raw: predict, batch of 32", timed(lambda: model.predict(batch), repeat), 32),
        ("raw: predict + TreeSHAP, batch of 32", timed(lambda: model.explain(batch), max(10, repeat // 8)), 32),
    ]
    return [(label, percentile(ms, 50), percentile(ms, 95), rows * 1000.0 / percentile(ms, 50)) for label, ms, rows in cases]


def service_load(url: str, records: list[dict], xai: bool, clients: int, requests: int) -> LoadResult:
    cycle = itertools.cycle(records)

    async def send(client):
        try:
            return await client.post(ROUTE, json={"patient_id": "P000001", "biomarkers": next(cycle), "xai": xai})
        except httpx.TransportError:
            return httpx.Response(TRANSPORT_ERROR)

    return run_load(send, url, clients, requests)


def mean_batch_sizes(url: str) -> dict[str, float]:
    """Rows per runner call so far, per BiomarkerModel method, from the server's Prometheus metrics."""
    totals: dict[str, dict[str, float]] = {}
    pattern = re.compile(r'^bentoml_service_adaptive_batch_size_(sum|count)\{(?P<labels>[^}]*)\} (?P<value>\S+)$')
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        match = pattern.match(line)
        if match and 'runner_name="BiomarkerModel"' in match["labels"]:
            method = re.search(r'method_name="(\w+)"', match["labels"])[1]
            totals.setdefault(method, {"sum": 0.0, "count": 0.0})[match[1]] += float(match["value"])
    return {method: t["sum"] / t["count"] for method, t in totals.items() if t["count"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1000, help="requests per served load level")
    args = parser.parse_args()
    records = generate_cohort(256, seed=2024).records
    table = ["| setting | clients | requests | errors | p50 ms | p95 ms | req/s |", "|---|---|---|---|---|---|---|"]
    for label, p50, p95, throughput in raw_model(records, repeat=500):
        table.append(f"| {label} | 1 | - | - | {p50:.2f} | {p95:.2f} | {throughput:.0f} |")
    env = {"NEURONOVA_AUTH__ENABLED": "false", "NEURONOVA_RATE_LIMIT__ENABLED": "false"}
    with served(env, Path(os.environ.get("TMPDIR", "/tmp")) / "neuronova-bench-biomarker.log") as url:
        for xai in (False, True):
            service_load(url, records, xai, 1, WARM_UP_REQUESTS)
        for clients, xai, note in PHASES:
            result = service_load(url, records, xai, clients, args.requests)
            table.append(f"| served: xai={'shap' if xai else 'off'}{note} | {clients} | {result.requests} | "
                         f"{result.errors} | {result.p50_ms:.2f} | {result.p95_ms:.2f} | {result.throughput:.0f} |")
        batches = mean_batch_sizes(url)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"model {get_settings().biomarker.model_tag}")
    print("\n".join(table))
    print("mean rows per runner call over the whole run: " + ", ".join(f"{m} {v:.2f}" for m, v in sorted(batches.items())))


if __name__ == "__main__":
    main()
