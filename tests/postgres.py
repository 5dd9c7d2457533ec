"""A real PostgreSQL server on loopback for the test session: initdb into a temp dir, pg_ctl start, stop at the end.

Skipped, with the reason, where the server binaries (`initdb`, `pg_ctl`, `postgres`) are not on PATH. PostgreSQL
refuses to run as root, so under root the binaries run as the `postgres` user (`runuser`).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

BINARIES = ("initdb", "pg_ctl", "postgres")
SERVER_USER = "postgres"
# A throwaway cluster: durability off for speed (the tests check behaviour, not crash safety of PostgreSQL).
SERVER_OPTIONS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"


@dataclass(frozen=True)
class PostgresServer:
    """A running server on 127.0.0.1 with a trusted superuser."""

    port: int
    user: str = SERVER_USER
    host: str = "127.0.0.1"

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL as an operator would set `NEURONOVA_FEEDBACK__DATABASE_URL`."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = f"test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host=self.host, port=self.port, user=self.user, dbname="postgres", autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _as_server_user(*args: str) -> list[str]:
    return ["runuser", "-u", SERVER_USER, "--", *args] if os.geteuid() == 0 else list(args)


def _run(*args: str) -> None:
    done = subprocess.run(_as_server_user(*args), check=False, capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {done.stdout}{done.stderr}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _missing_prerequisites() -> str | None:
    missing = [name for name in BINARIES if shutil.which(name) is None]
    if missing:
        return f"PostgreSQL server binaries not on PATH: {', '.join(missing)}"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root and there is no {SERVER_USER!r} user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and `runuser` is not on PATH"
    return None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session (about 2 s to start), on a free loopback port."""
    reason = _missing_prerequisites()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="neuronova-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, SERVER_USER, SERVER_USER)
    data = root / "data"
    server = PostgresServer(port=_free_port())
    try:
        _run("initdb", "-D", str(data), "-U", SERVER_USER, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
        options = f"-c listen_addresses={server.host} -p {server.port} -c unix_socket_directories={root} {SERVER_OPTIONS}"
        try:
            _run("pg_ctl", "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w", "-t", "30", "start")
        except RuntimeError as error:
            raise RuntimeError(f"{error}\nserver log:\n{(root / 'server.log').read_text()}") from None
        yield server
    finally:
        if (data / "postmaster.pid").exists():
            _run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
