"""One real `bentoml serve` process for the HTTP tests, started once per session on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

ROOT = Path(__file__).resolve().parents[2]
JWT_SECRET = "http-test-secret-0123456789-abcdefghij"
STARTUP_TIMEOUT_S = 240


def make_token(role: str = "clinician", subject: str = "django-test", ttl_s: int = 3600) -> str:
    """A token as Django issues it: HS256 with the shared secret."""
    return jwt.encode({"sub": subject, "role": role, "exp": int(time.time()) + ttl_s}, JWT_SECRET, algorithm="HS256")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def server_url(demo_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start the whole service (API workers + runners) and wait until /readyz answers."""
    port = _free_port()
    state = tmp_path_factory.mktemp("server-state")
    env = {
        **os.environ,
        "NEURONOVA_AUTH__SECRET": JWT_SECRET,
        "NEURONOVA_RATE_LIMIT__DEFAULT_PER_MINUTE": "100000",
        "NEURONOVA_RATE_LIMIT__PER_ROUTE_PER_MINUTE": "{}",
        "NEURONOVA_DATA_DIR": str(state / "data"),
        "BENTOML_RESULT_STORE": str(state / "tasks.db"),
        "PYTHONUNBUFFERED": "1",
    }
    log_path = state / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "service:NeuroNova", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, log_path)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _wait_ready(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token()}"}


@pytest.fixture(scope="session")
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(role='admin')}"}


@pytest.fixture(scope="session")
def http(server_url: str, auth_headers: dict[str, str]) -> Iterator[httpx.Client]:
    """A raw HTTP client with a valid clinician token."""
    with httpx.Client(base_url=server_url, headers=auth_headers, timeout=120) as client:
        yield client
