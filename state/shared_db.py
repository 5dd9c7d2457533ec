"""The replicas' shared PostgreSQL (`distributed.database_url`) for the small shared facts: which model version each
route serves (`active_models`) and what each replica's runner serves now (`replica_models`), where an uploaded export
lies (`model_exports`) and the rate-limit counters.

One engine per process, made on first use (runner and API processes alike), schema created if missing under an
advisory lock so that replicas starting together do not race on PostgreSQL's catalog. The counters are an UNLOGGED
table: a crash of PostgreSQL forgets them (a minute of counting), in exchange for no WAL write per request.

**The connection budget** lives here too. A process has one bounded pool per database URL (`pooled_engine`), shared
by everything it stores there (registry, counters, feedback records, task rows through `connection`); an API worker
adds the job queue's pool and its LISTEN connection (`state.job_queue`). Every connection has a connect timeout and
an `application_name` naming the replica and the process role, so `pg_stat_activity` shows who holds what.
`replica_budget` adds it up; docs/scale-out.md has the table.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import bentoml
import psycopg
import sqlalchemy.exc
from psycopg.rows import dict_row, tuple_row
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    make_url,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.schema import CreateTable

from core.settings import get_settings
from state.dependency_health import DATABASE_UNREACHABLE, Breaker, breaker

# pg_advisory_xact_lock key serialising this schema's creation (distinct from state.feedback_db's).
SCHEMA_LOCK_KEY = 0x4E4E_5201
PG_CONNECT_TIMEOUT_S = 3
"""How long any connection attempt to PostgreSQL may take (libpq's connect_timeout, in every pool and connection of
the service): an unreachable database is an answer within seconds, not a hang."""
POOL_WAIT_S = 5.0
"""How long a caller waits for a pooled connection before the error (SQLAlchemy's default is 30 s)."""

ProcessRole = Literal["api", "runner", "start", "tool"]
"""Who holds a connection: an API worker, a runner process, the arbiter's start-up work (`start_up`), or anything
else (a script, the fine-tuning job, a test)."""
POOL_SIZE: dict[ProcessRole, int] = {"api": 2, "runner": 1, "start": 1, "tool": 1}
"""Connections of a process's pool per database (no overflow). An API worker: rate-limit counts, task rows, feedback
records, the registry (each a round trip of about a millisecond, from a thread). A runner: the registry poll (once a
second, with its `replica_models` row) and, in the MRI runner, progress and cancel checks; they take turns."""
QUEUE_POOL_SIZE = 1
"""The job queue's pool in an API worker (`state.job_queue`): job fetching, heartbeat, stalled-job check, deferring
(short queries, in turn; procrastinate runs one job at a time here)."""
QUEUE_LISTEN_CONNECTIONS = 1
"""procrastinate's LISTEN connection, held for the worker's life outside its pool."""
POSTGRES_MAX_CONNECTIONS = 100
POSTGRES_RESERVED_CONNECTIONS = 3
"""PostgreSQL's defaults: `max_connections` and `superuser_reserved_connections`; the service may use the rest (97)."""
APPLICATION_NAME_BYTES = 63
"""PostgreSQL keeps this much of `application_name` (NAMEDATALEN - 1)."""

metadata = MetaData()

active_models = Table(
    "neuronova_active_models", metadata,
    Column("model_id", String(64), primary_key=True),
    Column("tag", String(256), nullable=False),
    Column("history", JSONB, nullable=False),
    Column("generation", BigInteger, nullable=False),
)

replica_models = Table(
    "neuronova_replica_models", metadata,
    Column("replica_id", String(256), primary_key=True),
    Column("model_id", String(64), primary_key=True),
    Column("tag", String(256)),
    Column("generation", BigInteger, nullable=False),
    Column("pending", String(256)),
    Column("error", Text),
    Column("updated_at", DateTime(timezone=True), nullable=False),
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
_SCHEMA_READY: set[str] = set()
_LOCK = threading.RLock()
_STARTING = threading.Event()
_ROLES: dict[str | None, ProcessRole] = {"entry_service": "api", "service": "runner"}


def process_role() -> ProcessRole:
    """This process's role, from the kind of BentoML worker it is (set by BentoML before the service is built: a
    worker of the entry service is an API worker, one of a dependency a runner), or `start` inside `start_up`;
    anything else is a tool."""
    return "start" if _STARTING.is_set() else _ROLES.get(bentoml.server_context.service_type, "tool")


@contextmanager
def start_up() -> Iterator[None]:
    """The arbiter's work before the workers start (schemas, recovery): its connections are named `start`, and the
    pools it opened are closed when it ends, so the arbiter holds no connection while the replica serves."""
    _STARTING.set()
    try:
        yield
    finally:
        _STARTING.clear()
        with _LOCK:
            for made in _ENGINES.values():
                made.dispose()
            _ENGINES.clear()


def process_budget(role: ProcessRole) -> int:
    """The most connections to the replicas' database a process of `role` holds."""
    queue = QUEUE_POOL_SIZE + QUEUE_LISTEN_CONNECTIONS if role == "api" else 0
    return POOL_SIZE[role] + queue


def replica_budget(api_workers: int, runner_processes: int) -> int:
    """The most connections one replica holds: its API workers' and its runner processes'."""
    return api_workers * process_budget("api") + runner_processes * process_budget("runner")


def application_name(role: str | None = None) -> str:
    """`neuronova:<replica>:<role>` (this process's role by default), the replica's name shortened to fit."""
    replica = get_settings().distributed.replica_id or socket.gethostname()
    role = role or process_role()
    room = APPLICATION_NAME_BYTES - len(f"neuronova::{role}")
    return f"neuronova:{replica.encode()[:room].decode(errors='ignore')}:{role}"


def libpq_options(role: str | None = None) -> dict[str, Any]:
    """What every connection of the service passes to libpq: the connect timeout and its `application_name`."""
    return {"connect_timeout": PG_CONNECT_TIMEOUT_S, "application_name": application_name(role)}


def pooled_engine(database_url: str) -> Engine:
    """This process's one engine (bounded pool, no overflow, `POOL_WAIT_S` wait, pre-ping) for the PostgreSQL at
    `database_url`, whichever of our stores uses that database."""
    parsed = make_url(database_url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")  # SQLAlchemy's default would be psycopg2
    key = parsed.render_as_string(hide_password=False)
    with _LOCK:
        if key not in _ENGINES:
            made = create_engine(parsed, pool_size=POOL_SIZE[process_role()], max_overflow=0, pool_pre_ping=True,
                                 pool_timeout=POOL_WAIT_S, connect_args=libpq_options())
            guard_engine(made, database_health(database_url))
            _ENGINES[key] = made
        return _ENGINES[key]


def libpq_url(database_url: str) -> str:
    """`database_url` as libpq takes it (a SQLAlchemy driver suffix such as `+psycopg` dropped)."""
    parsed = make_url(database_url)
    return parsed.set(drivername=parsed.get_backend_name()).render_as_string(hide_password=False)


def database_health(database_url: str) -> Breaker:
    """This process's breaker of the PostgreSQL at `database_url` (`state.dependency_health`): tripped by any
    connection to it that fails, probed with `SELECT 1` while open."""
    conninfo = libpq_url(database_url)

    def probe() -> None:
        with psycopg.connect(conninfo, autocommit=True, **libpq_options()) as connection:
            connection.execute("SELECT 1")

    def pooled_probe() -> None:
        with connection(database_url) as pooled:
            pooled.execute("SELECT 1")

    return breaker("database", conninfo,
                   lambda: Breaker("the database", DATABASE_UNREACHABLE, probe, ready_probe=pooled_probe))


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


def engine(database_url: str | None = None) -> Engine:
    """This process's engine for `database_url` (default: the configured distributed database), schema ensured."""
    url = database_url or get_settings().distributed.database_url
    if url is None:
        raise RuntimeError("distributed.database_url is not set (embedded mode has no shared database)")
    health = database_health(url)
    health.check()
    made = pooled_engine(url)
    with _LOCK:
        if url not in _SCHEMA_READY:
            try:
                create_schema(made)
            except sqlalchemy.exc.OperationalError as exc:  # the database refused or did not answer
                raise health.tripped(exc) from exc
            _SCHEMA_READY.add(url)
    return made


@contextmanager
def connection(database_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """A psycopg connection borrowed from this process's pool for `database_url` (rows as dicts), its transaction
    committed when the block ends (rolled back on an error), then given back. A connection that cannot be made or is
    lost midway trips the database's breaker and raises `DependencyUnavailable` (so does any call while the breaker
    is open); other errors are psycopg's own; a pool whose connections are all lent for `POOL_WAIT_S` raises
    SQLAlchemy's TimeoutError."""
    health = database_health(database_url)
    health.check()
    try:
        pooled = pooled_engine(database_url).raw_connection()
    except sqlalchemy.exc.DBAPIError as exc:  # could not connect: the driver's error, not SQLAlchemy's wrapper
        raise health.tripped(exc.orig) from exc.orig
    except psycopg.OperationalError as exc:
        raise health.tripped(exc) from exc
    driver: psycopg.Connection[Any] = pooled.driver_connection
    driver.row_factory = dict_row
    try:
        yield driver
        driver.commit()
    except BaseException as exc:
        if driver.broken:
            pooled.invalidate()  # lost: the pool opens a new one
            if isinstance(exc, psycopg.OperationalError):
                raise health.tripped(exc) from exc
        raise
    finally:
        if not driver.closed:
            driver.row_factory = tuple_row  # as SQLAlchemy expects it
        pooled.close()


def create_schema(made: Engine) -> None:
    """Create the missing tables; replicas and workers starting together are safe."""
    with made.begin() as connection:
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        for table in metadata.sorted_tables:
            connection.execute(CreateTable(table, if_not_exists=True))
