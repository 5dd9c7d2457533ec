"""Start a real `bentoml serve` on loopback and drive it with a bounded number of concurrent requests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
SERVER_TAG = "NEURONOVA_SERVER_TAG"
"""Set in the environment of every server this harness starts, so each of its processes is found by it: BentoML
starts each worker in a session of its own, and a worker whose arbiter died leaves the process tree (parent 1)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Server:
    """A server started by this harness: its base URL and the pid of its top process (arbiter or gunicorn master)."""

    url: str
    pid: int


class ServerProcess(subprocess.Popen):
    """A server's top process; `tag` is the value of `SERVER_TAG` in the environment of every process it starts."""

    tag: str


def start_process(command: list[str], env: dict[str, str], log_path: Path, port: int,
                  cwd: Path = ROOT) -> ServerProcess:
    """`command` (with `{port}` filled in) in `cwd`, in its own process group with extra `env` and a fresh
    `SERVER_TAG`, output to `log_path`."""
    tag = uuid.uuid4().hex
    with open(log_path, "ab") as log:
        process = ServerProcess(
            [part.format(port=port) for part in command], cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env, SERVER_TAG: tag},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    process.tag = tag
    return process


def tagged_processes(name: str, value: str) -> list[psutil.Process]:
    """Every live process (zombies aside) whose environment sets `name` to `value`."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.status() != psutil.STATUS_ZOMBIE and process.environ().get(name) == value:
                found.append(process)
    return found


def kill_processes(processes: list[psutil.Process]) -> None:
    """SIGKILL `processes` and wait until they are gone."""
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=30)


def wait_ready(process: subprocess.Popen, url: str, log_path: Path, ready_path: str = "/readyz",
               timeout_s: float = 240.0) -> None:
    """Return once `url + ready_path` answers below 500; raise with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}{ready_path}", timeout=2).status_code < 500:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not ready after {timeout_s}s:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)


def stop_group(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the process group of `process`; SIGKILL what is left of it after `grace_s`, and then, for a server
    started by `start_process`, every process of it that is still alive, wherever it is (orphaned workers included)."""
    started = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    tag = getattr(process, "tag", None)
    if tag is None:
        return
    left = tagged_processes(SERVER_TAG, tag)
    _, still = psutil.wait_procs(left, timeout=max(0.0, grace_s - (time.monotonic() - started)))
    kill_processes(still)


def own_bentoml_home(home: Path) -> dict[str, str]:
    """A BENTOML_HOME for one server that shares this process's model store (a link to its `models`): every
    `bentoml serve` empties its home's Prometheus directory as it starts, so servers sharing one home wipe each
    other's metrics (docs/bentoml-pitfalls.md G24)."""
    shared = Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml").resolve()
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "models").exists():
        (shared / "models").mkdir(parents=True, exist_ok=True)
        (home / "models").symlink_to(shared / "models", target_is_directory=True)
    return {"BENTOML_HOME": str(home)}


@contextlib.contextmanager
def serving(command: list[str], env: dict[str, str], log_path: Path, ready_path: str = "/readyz",
            timeout_s: float = 240.0, cwd: Path = ROOT) -> Iterator[Server]:
    """`command` (with `{port}` filled in) in `cwd` (this checkout by default), in its own process group with extra
    `env` and a BentoML home of its own; yields it once `ready_path` answers 200, and stops the whole group
    afterwards."""
    port = free_port()
    log_path.write_bytes(b"")
    process = start_process(command, {**own_bentoml_home(log_path.with_name(f"{log_path.stem}-bentoml-home")), **env},
                            log_path, port, cwd)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, url, log_path, ready_path, timeout_s)
        yield Server(url, process.pid)
    finally:
        stop_group(process)


BENTOML_SERVE = [sys.executable, "-m", "bentoml", "serve", "service:NeuroNova", "--host", "127.0.0.1", "--port", "{port}"]


@contextlib.contextmanager
def served(env: dict[str, str], log_path: Path, timeout_s: float = 240.0) -> Iterator[str]:
    """`bentoml serve service:NeuroNova` in its own process group with extra `env`; yields the base URL when ready."""
    with serving(BENTOML_SERVE, env, log_path, timeout_s=timeout_s) as server:
        yield server.url


@dataclass(frozen=True)
class LoadResult:
    clients: int
    requests: int
    errors: int
    wall_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    failures: dict[int, int]
    """Count of each non-200 status."""

    @property
    def throughput(self) -> float:
        return (self.requests - self.errors) / self.wall_s


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


async def _run_load(send: Callable[[httpx.AsyncClient], Awaitable[httpx.Response]], url: str, clients: int,
                    requests: int, headers: dict[str, str]) -> LoadResult:
    latencies: list[float] = []
    failures: dict[int, int] = {}
    remaining = iter(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        for _ in remaining:
            started = time.perf_counter()
            response = await send(client)
            latencies.append((time.perf_counter() - started) * 1000.0)
            if response.status_code != 200:
                failures[response.status_code] = failures.get(response.status_code, 0) + 1

    async with contextlib.AsyncExitStack() as stack:  # clients made before the clock starts (each builds a TLS context)
        connections = [await stack.enter_async_context(httpx.AsyncClient(
            base_url=url, headers=headers, timeout=300, limits=httpx.Limits(max_connections=1))) for _ in range(clients)]
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for client in connections))
        wall = time.perf_counter() - started
    return LoadResult(clients, requests, sum(failures.values()), wall, percentile(latencies, 50),
                      percentile(latencies, 95), percentile(latencies, 99), failures)


def run_load(send: Callable[[httpx.AsyncClient], Awaitable[httpx.Response]], url: str, clients: int, requests: int,
             headers: dict[str, str] | None = None) -> LoadResult:
    """`requests` calls of `send` from `clients` concurrent clients, each with a connection of its own (as separate
    callers have; one shared httpx pool costs the load generator itself ~3 ms of CPU per request on keep-alive
    connections, docs/performance.md); latency percentiles and throughput."""
    return asyncio.run(_run_load(send, url, clients, requests, headers or {}))


def timed(func: Callable[[], object], repeat: int) -> list[float]:
    """Milliseconds of `repeat` calls of `func` (after one warm-up call)."""
    func()
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        func()
        out.append((time.perf_counter() - started) * 1000.0)
    return out
