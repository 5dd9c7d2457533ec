"""What the replicas' shared rate limit costs per request: `SharedWindows.admit` (one UPSERT round trip to
PostgreSQL, in a thread) against the embedded per-worker `LocalWindows`.

Run: `.venv/bin/python bench/rate_limit.py --database-url postgresql://user@host:5432/db [--calls 2000]`. Prints
per-call latency (sequential: the cost a request pays) and throughput with 32 concurrent callers in one event loop
(as one API worker under load), each on its own client bucket, and writes bench/results/rate_limit.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import bentoml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.limits import LocalWindows, SharedWindows  # noqa: E402
from state import shared_db  # noqa: E402

LIMIT = 10**9  # never refuse: measure the counting, not the refusals
CONCURRENCY = 32


async def sequential(windows: LocalWindows | SharedWindows, calls: int) -> list[float]:
    timings = []
    for index in range(calls):
        started = time.perf_counter()
        await windows.admit(f"client-{index % 50} /predict/ct_classification", LIMIT)
        timings.append((time.perf_counter() - started) * 1000.0)
    return timings


async def concurrent(windows: LocalWindows | SharedWindows, calls: int) -> float:
    async def caller(worker: int) -> None:
        for _ in range(calls // CONCURRENCY):
            await windows.admit(f"client-{worker} /predict/ct_classification", LIMIT)

    started = time.perf_counter()
    await asyncio.gather(*(caller(worker) for worker in range(CONCURRENCY)))
    return (calls // CONCURRENCY) * CONCURRENCY / (time.perf_counter() - started)


def summary(timings: list[float], rate: float) -> dict[str, float]:
    ordered = sorted(timings)
    return {"mean_ms": round(statistics.fmean(ordered), 3), "p50_ms": round(ordered[len(ordered) // 2], 3),
            "p99_ms": round(ordered[int(len(ordered) * 0.99)], 3), "concurrent_per_s": round(rate)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    bentoml.server_context.service_type = "entry_service"  # this process's pool is an API worker's
    shared_db.engine(args.database_url)  # schema and pool before timing
    results = {}
    for name, windows in (("local", LocalWindows()), ("shared_postgresql", SharedWindows(args.database_url))):
        asyncio.run(sequential(windows, 50))  # warm up: pool connections, executor threads
        timings = asyncio.run(sequential(windows, args.calls))
        results[name] = summary(timings, asyncio.run(concurrent(windows, args.calls)))
        print(f"{name:>18}: {results[name]}")
    out = Path(__file__).parent / "results" / "rate_limit.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
