"""One real `bentoml serve` process for the HTTP tests, started once per session on a free loopback port."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from bench.harness import served
from tests.postgres import service_database_url

JWT_SECRET = "http-test-secret-0123456789-abcdefghij"


def make_token(role: str = "clinician", subject: str = "django-test", ttl_s: int = 3600) -> str:
    """A token as Django issues it: HS256 with the shared secret."""
    return jwt.encode({"sub": subject, "role": role, "exp": int(time.time()) + ttl_s}, JWT_SECRET, algorithm="HS256")


@pytest.fixture(scope="session")
def served_database_url(request: pytest.FixtureRequest) -> str | None:
    """The served instance's feedback database: PostgreSQL where the session runs it, else its SQLite default."""
    return service_database_url(request)


@pytest.fixture(scope="session")
def server_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The served instance's state: `data/` (NEURONOVA_DATA_DIR), `tasks.db` (BentoML's task store), `server.log`."""
    return tmp_path_factory.mktemp("server-state")


@pytest.fixture(scope="session")
def server_url(demo_models: dict[str, str], served_database_url: str | None, server_state: Path) -> Iterator[str]:
    """Start the whole service (API workers + runners) and wait until /readyz answers."""
    env = {**server_env(server_state / "data", served_database_url), "BENTOML_RESULT_STORE": str(server_state / "tasks.db")}
    with served(env, server_state / "server.log") as url:
        yield url


def server_env(data_dir: Path, database_url: str | None) -> dict[str, str]:
    """The environment of a served test instance: the test JWT secret, rate limits out of the way, its data dir and
    feedback database (the replicas harness, tests/replicas.py, starts its replicas with it too)."""
    return {
        "NEURONOVA_FEEDBACK__DATABASE_URL": database_url or "",
        "NEURONOVA_AUTH__SECRET": JWT_SECRET,
        "NEURONOVA_RATE_LIMIT__DEFAULT_PER_MINUTE": "100000",
        "NEURONOVA_RATE_LIMIT__PER_ROUTE_PER_MINUTE": "{}",
        "NEURONOVA_DATA_DIR": str(data_dir),
    }


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
