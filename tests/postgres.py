"""A real PostgreSQL server on loopback for the test session: initdb into a temp dir, pg_ctl start, stop at the end.

The server binaries (`initdb`, `pg_ctl`, `postgres`) are looked up on PATH, then in Debian's versioned directories
(`/usr/lib/postgresql/<version>/bin`, the newest first), which the `postgresql` package keeps off PATH. Where none is
found the PostgreSQL tests skip with the reason, except under CI (`CI` set), where they fail: CI installs the server
(`.ci/run`), so a missing one is a broken set-up, not a reason to pass. PostgreSQL refuses to run as root, so under
root the binaries run as the `postgres` user (`runuser`).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from bench.harness import free_port
from tests.prerequisites import under_ci, unavailable

BINARIES = ("initdb", "pg_ctl", "postgres")
DEBIAN_ROOT = Path("/usr/lib/postgresql")
SERVER_USER = "postgres"
# A throwaway cluster: durability off for speed (the tests check behaviour, not crash safety of PostgreSQL).
SERVER_OPTIONS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"


@dataclass(frozen=True)
class PostgresServer:
    """A running server on 127.0.0.1 with a trusted superuser; `stop` and `start` it for an outage (pg_ctl)."""

    port: int
    root: Path
    binaries: Path
    user: str = SERVER_USER
    host: str = "127.0.0.1"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def start(self) -> None:
        """`pg_ctl start`, waiting until it accepts connections (the log is appended to `<root>/server.log`)."""
        options = f"-c listen_addresses={self.host} -p {self.port} -c unix_socket_directories={self.root} {SERVER_OPTIONS}"
        try:
            _run(str(self.binaries / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options,
                 "-w", "-t", "30", "start")
        except RuntimeError as error:
            raise RuntimeError(f"{error}\nserver log:\n{(self.root / 'server.log').read_text()}") from None

    def stop(self, mode: str = "fast") -> None:
        """`pg_ctl stop` (fast: sessions are ended, as an operator's restart or a failover does), waiting until down."""
        _run(str(self.binaries / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL as an operator would set `NEURONOVA_FEEDBACK__DATABASE_URL`."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = f"test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host=self.host, port=self.port, user=self.user, dbname="postgres", autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def binary_dir(path: str | None, debian_root: Path = DEBIAN_ROOT) -> Path | None:
    """The directory holding all of `BINARIES`: on `path` (PATH syntax), else the newest `<debian_root>/<ver>/bin`."""
    found = [shutil.which(name, path=path) for name in BINARIES]
    if all(found) and len({Path(f).parent for f in found}) == 1:
        return Path(found[0]).parent
    versions = sorted((d for d in debian_root.glob("*") if re.fullmatch(r"\d+(\.\d+)?", d.name)),
                      key=lambda d: tuple(int(part) for part in d.name.split(".")), reverse=True)
    for version in versions:
        if all(shutil.which(name, path=str(version / "bin")) for name in BINARIES):
            return version / "bin"
    return None


def missing_prerequisites(path: str | None, debian_root: Path = DEBIAN_ROOT) -> str | None:
    """Why a server cannot be started here, or None."""
    if binary_dir(path, debian_root) is None:
        return (f"PostgreSQL server binaries ({', '.join(BINARIES)}) neither on PATH nor in {debian_root}/<version>/bin "
                "(Debian: apt-get install postgresql)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root and there is no {SERVER_USER!r} user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and `runuser` is not on PATH"
    return None


def require_server(path: str | None = None, debian_root: Path = DEBIAN_ROOT) -> Path:
    """The binaries' directory; otherwise skip the test, or fail it under CI."""
    reason = missing_prerequisites(path, debian_root)
    if reason is None:
        return binary_dir(path, debian_root)  # type: ignore[return-value]
    unavailable("PostgreSQL", reason)


def _as_server_user(*args: str) -> list[str]:
    return ["runuser", "-u", SERVER_USER, "--", *args] if os.geteuid() == 0 else list(args)


def _run(*args: str) -> None:
    done = subprocess.run(_as_server_user(*args), check=False, capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {done.stdout}{done.stderr}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session (about 2 s to start), on a free loopback port."""
    binaries = require_server()
    root = Path(tempfile.mkdtemp(prefix="neuronova-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, SERVER_USER, SERVER_USER)
    server = PostgresServer(port=free_port(), root=root, binaries=binaries)
    try:
        _run(str(binaries / "initdb"), "-D", str(server.data), "-U", SERVER_USER, "-A", "trust", "-E", "UTF8",
             "--locale=C", "--no-sync")
        server.start()
        yield server
    finally:
        if (server.data / "postmaster.pid").exists():
            server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def service_database_url(request: pytest.FixtureRequest) -> str | None:
    """`NEURONOVA_FEEDBACK__DATABASE_URL` for a service under test: a fresh database on the session server where
    PostgreSQL can run (always under CI, see `require_server`); None elsewhere, leaving the service on its default
    SQLite file. The tests that claim PostgreSQL ask for `postgres_server` themselves, so they skip (or fail) there."""
    if missing_prerequisites(None) is not None and not under_ci():
        return None
    return request.getfixturevalue("postgres_server").new_database()
