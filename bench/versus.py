"""Our service against a plain server of the original design, on the same machine in the same run.

Each server is started fresh and measured alone, in turn: 1-client p50 on the fresh server (after a short warm-up),
throughput and latency at 32 clients, 1-client p50 right after that burst (a learned batching wait would show here),
and the resident memory of its whole process tree after the load. Only ratios from one run are compared: the load
generator shares the cores with the server.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from bench.harness import LoadResult, Server, run_load, serving

GUNICORN = [sys.executable, "-m", "gunicorn", "-w", "2", "-b", "127.0.0.1:{port}", "--log-level", "warning"]
"""The plain servers' command: Flask under `gunicorn -w 2` (sync workers), as the original design ran."""
WARM_UP, SINGLE, BURST_CLIENTS, BURST = 8, 256, 32, 1536
"""BURST: the issue's 384 requests took the plain biomarker server half a second, too short to read a throughput
from (ratios of one set varied 0.86-1.43); four times that settles it. SINGLE: the median of 64 lone requests moved
±30 % from block to block on an unchanged server on two shared cores; 256 halves its standard error."""

Send = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


@dataclass(frozen=True)
class Measured:
    """One server's figures from one run; memory per process as (RSS, PSS) MiB."""

    fresh: LoadResult
    burst: LoadResult
    after_burst: LoadResult
    memory_mb: dict[str, tuple[float, float]]

    @property
    def total_rss_mb(self) -> float:
        """The sum of the processes' resident sets (pages shared between them, libraries, counted in each)."""
        return sum(rss for rss, _ in self.memory_mb.values())

    @property
    def total_pss_mb(self) -> float:
        """The sum of proportional set sizes: each shared page divided among the processes sharing it."""
        return sum(pss for _, pss in self.memory_mb.values())


def process_memory_mb(pid: int) -> dict[str, tuple[float, float]]:
    """(RSS, PSS) MiB of a process and all its descendants, keyed `<name or service>:<pid>`."""
    root = psutil.Process(pid)
    out = {}
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            args = process.cmdline()
            name = args[args.index("--service-name") + 1] if "--service-name" in args else process.name()
            memory = process.memory_full_info()
            out[f"{name}:{process.pid}"] = (memory.rss / 2**20, memory.pss / 2**20)
    return out


def measure(server: Server, send: Send) -> Measured:
    """The four figures of one fresh server (see the module doc)."""
    run_load(send, server.url, 1, WARM_UP)
    fresh = run_load(send, server.url, 1, SINGLE)
    burst = run_load(send, server.url, BURST_CLIENTS, BURST)
    after = run_load(send, server.url, 1, SINGLE)
    return Measured(fresh, burst, after, process_memory_mb(server.pid))


def compare(ours: Callable[[], contextlib.AbstractContextManager[Server]], plain_app: str, plain_env: dict[str, str],
            send: Send, log_dir: Path, plain_first: bool = False) -> tuple[Measured, Measured]:
    """Measure our service and the plain `plain_app` (a `module:app` for gunicorn), each alone on the machine, in
    the order given (alternate it between runs: on a shared machine the load of others drifts)."""
    def plain() -> contextlib.AbstractContextManager[Server]:
        return serving([*GUNICORN, plain_app], plain_env, log_dir / "plain.log", ready_path="/")

    figures = {}
    for name, start in ((("plain", plain), ("ours", ours)) if plain_first else (("ours", ours), ("plain", plain))):
        with start() as server:
            figures[name] = measure(server, send)
    return figures["ours"], figures["plain"]


def ratios(mine: Measured, theirs: Measured) -> dict[str, float]:
    """ours / plain: throughput at 32 clients (higher is better); p50s and memory (lower is better)."""
    return {
        "throughput_c32": mine.burst.throughput / theirs.burst.throughput,
        "p50_fresh": mine.fresh.p50_ms / theirs.fresh.p50_ms,
        "p50_after_burst": mine.after_burst.p50_ms / theirs.after_burst.p50_ms,
        "rss": mine.total_rss_mb / theirs.total_rss_mb,
        "pss": mine.total_pss_mb / theirs.total_pss_mb,
    }


def report(runs: list[tuple[Measured, Measured]]) -> str:
    """A Markdown table per run and the ratios of all runs."""
    lines = []
    for index, (mine, theirs) in enumerate(runs, 1):
        lines += [f"run {index}:", "| server | errors | c32 req/s | c32 p50 ms | c32 p99 ms | 1-client p50 fresh ms "
                  "| 1-client p50 after burst ms | RSS after load MB | PSS after load MB |", "|---|---|---|---|---|---|---|---|---|"]
        for name, m in (("ours", mine), ("plain", theirs)):
            errors = m.fresh.errors + m.burst.errors + m.after_burst.errors
            lines.append(f"| {name} | {errors} | {m.burst.throughput:.1f} | {m.burst.p50_ms:.1f} | {m.burst.p99_ms:.1f} "
                         f"| {m.fresh.p50_ms:.2f} | {m.after_burst.p50_ms:.2f} | {m.total_rss_mb:.0f} | {m.total_pss_mb:.0f} |")
        lines.append("ours by process, RSS/PSS MB: "
                     + ", ".join(f"{k} {rss:.0f}/{pss:.0f}" for k, (rss, pss) in sorted(mine.memory_mb.items())))
        lines.append("")
    lines += ["| ours / plain | " + " | ".join(f"run {i}" for i in range(1, len(runs) + 1)) + " |",
              "|---|" + "---|" * len(runs)]
    table = [ratios(mine, theirs) for mine, theirs in runs]
    for key, goal in (("throughput_c32", "≥ 0.7"), ("p50_fresh", "≤ 1.5"), ("p50_after_burst", "≤ 1.5"), ("rss", ""),
                      ("pss", "")):
        lines.append(f"| {key} ({goal or 'info'}) | " + " | ".join(f"{r[key]:.2f}" for r in table) + " |")
    return "\n".join(lines)



def print_and_save(runs: list[tuple[Measured, Measured]], name: str) -> None:
    """Print the machine and the runs' tables; keep the ratios in bench/results/<name>.json."""
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"machine: {machine}\n" + report(runs))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    figures = [{server: {"c32_req_s": m.burst.throughput, "c32_p50_ms": m.burst.p50_ms, "p50_fresh_ms": m.fresh.p50_ms,
                         "p50_after_burst_ms": m.after_burst.p50_ms, "rss_mb": m.total_rss_mb}
                for server, m in (("ours", mine), ("plain", theirs))} for mine, theirs in runs]
    (out / f"{name}.json").write_text(json.dumps({"machine": machine, "ratios": [ratios(*run) for run in runs],
                                                  "figures": figures}, indent=2))
