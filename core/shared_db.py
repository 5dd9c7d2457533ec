"""The replicas' shared PostgreSQL (`distributed.database_url`) for the small shared facts: which model version each
route serves (`active_models`), where an uploaded export lies (`model_exports`) and the rate-limit counters.

One engine per process, made on first use (runner and API processes alike), schema created if missing under an
advisory lock so that replicas starting together do not race on PostgreSQL's catalog. The counters are an UNLOGGED
table: a crash of PostgreSQL forgets them (a minute of counting), in exchange for no WAL write per request.
"""

from __future__ import annotations

import threading

import psycopg
import sqlalchemy.exc
from sqlalchemy import (BigInteger, Column, Engine, Integer, MetaData, String, Table, create_engine, event, make_url,
                        text)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.schema import CreateTable

from core.dependency_health import DATABASE_UNREACHABLE, Breaker, breaker
from core.settings import get_settings

# pg_advisory_xact_lock key serialising this schema's creation (distinct from core.feedback_db's).
SCHEMA_LOCK_KEY = 0x4E4E_5201
PG_CONNECT_TIMEOUT_S = 3
"""How long any connection attempt to PostgreSQL may take (libpq's connect_timeout, in every pool and connection of
the service): an unreachable database is an answer within seconds, not a hang."""
POOL_WAIT_S = 5.0
"""How long a caller waits for a pooled connection before the error (SQLAlchemy's default is 30 s)."""
POOL_SIZE = 2
MAX_OVERFLOW = 2
"""Connections per process: a runner polls on one; an API worker counts rate limits on up to four at once (0.35 ms
each). A replica (2 API workers, 3 runners) holds at most 20, the task queue's own pool aside: size PostgreSQL's
max_connections (or a PgBouncer) for the replica count."""

metadata = MetaData()

active_models = Table(
    "neuronova_active_models", metadata,
    Column("model_id", String(64), primary_key=True),
    Column("tag", String(256), nullable=False),
    Column("history", JSONB, nullable=False),
    Column("generation", BigInteger, nullable=False),
)

model_exports = Table(
    "neuronova_model_exports", metadata,
    Column("tag", String(256), primary_key=True),
    Column("sha256", String(64), nullable=False),
)

rate_limit_windows = Table(
    "neuronova_rate_limits", metadata,
    Column("bucket", String(512), primary_key=True),
    Column("window_start", BigInteger, primary_key=True),
    Column("hits", Integer, nullable=False),
    prefixes=["UNLOGGED"],
)

_ENGINES: dict[str, Engine] = {}
_LOCK = threading.Lock()


def libpq_url(database_url: str) -> str:
    """`database_url` as libpq takes it (a SQLAlchemy driver suffix such as `+psycopg` dropped)."""
    parsed = make_url(database_url)
    return parsed.set(drivername=parsed.get_backend_name()).render_as_string(hide_password=False)


def database_health(database_url: str) -> Breaker:
    """This process's breaker of the PostgreSQL at `database_url` (`core.dependency_health`): tripped by any
    connection to it that fails, probed with `SELECT 1` while open."""
    conninfo = libpq_url(database_url)

    def probe() -> None:
        with psycopg.connect(conninfo, connect_timeout=PG_CONNECT_TIMEOUT_S, autocommit=True) as connection:
            connection.execute("SELECT 1")

    return breaker("database", conninfo, lambda: Breaker("the database", DATABASE_UNREACHABLE, probe))


def engine(database_url: str | None = None) -> Engine:
    """This process's engine for `database_url` (default: the configured distributed database), schema ensured;
    `DependencyUnavailable` at once while the database's breaker is open."""
    url = database_url or get_settings().distributed.database_url
    if url is None:
        raise RuntimeError("distributed.database_url is not set (embedded mode has no shared database)")
    health = database_health(url)
    health.check()
    with _LOCK:
        if url not in _ENGINES:
            parsed = make_url(url)
            if parsed.drivername == "postgresql":
                parsed = parsed.set(drivername="postgresql+psycopg")
            made = create_engine(parsed, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW, pool_pre_ping=True,
                                 pool_timeout=POOL_WAIT_S, connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S})
            guard_engine(made, health)
            try:
                create_schema(made)
            except sqlalchemy.exc.OperationalError as exc:  # no pool yet: the database refused or did not answer
                raise health.tripped(exc) from exc
            _ENGINES[url] = made
        return _ENGINES[url]


def guard_engine(made: Engine, health: Breaker) -> None:
    """Tie `made` to the breaker `health`: no new connection is tried while it is open (`DependencyUnavailable` at
    once), and a lost or refused connection trips it (the engine's own error is raised on)."""

    @event.listens_for(made, "do_connect")
    def _refuse_while_down(*_: object) -> None:
        health.check()

    @event.listens_for(made, "handle_error")
    def _lost(context: ExceptionContext) -> None:
        if context.is_pre_ping:  # a pooled connection that died earlier: the pool replaces it, the database may be up
            return
        if context.is_disconnect or context.connection is None:  # dropped, or no connection could be made
            health.tripped(context.original_exception)


def create_schema(made: Engine) -> None:
    """Create the missing tables; replicas and workers starting together are safe."""
    with made.begin() as connection:
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        for table in metadata.sorted_tables:
            connection.execute(CreateTable(table, if_not_exists=True))
