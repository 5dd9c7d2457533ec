"""The replicas' shared PostgreSQL (`distributed.database_url`) for the small shared facts: which model version each
route serves (`active_models`) and what each replica's runner serves now (`replica_models`), where an uploaded export
lies (`model_exports`) and the rate-limit counters.

One engine per process, made on first use (runner and API processes alike), schema created if missing under an
advisory lock so that replicas starting together do not race on PostgreSQL's catalog. The counters are an UNLOGGED
table: a crash of PostgreSQL forgets them (a minute of counting), in exchange for no WAL write per request.
"""

from __future__ import annotations

import threading

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
    make_url,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.schema import CreateTable

from core.settings import get_settings

# pg_advisory_xact_lock key serialising this schema's creation (distinct from state.feedback_db's).
SCHEMA_LOCK_KEY = 0x4E4E_5201
PG_CONNECT_TIMEOUT_S = 3
"""How long any connection attempt to PostgreSQL may take (libpq's connect_timeout, in every pool and connection of
the service): an unreachable database is an answer within seconds, not a hang."""
POOL_WAIT_S = 5.0
"""How long a caller waits for a pooled connection before the error (SQLAlchemy's default is 30 s)."""
POOL_SIZE = 2
MAX_OVERFLOW = 2
"""Connections per process: a runner polls (and writes its `replica_models` row) on one; an API worker counts rate
limits on up to four at once (0.35 ms each). A replica (2 API workers, 3 runners) holds at most 20, the task queue's own pool aside: size PostgreSQL's
max_connections (or a PgBouncer) for the replica count."""

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
_LOCK = threading.Lock()


def engine(database_url: str | None = None) -> Engine:
    """This process's engine for `database_url` (default: the configured distributed database), schema ensured."""
    url = database_url or get_settings().distributed.database_url
    if url is None:
        raise RuntimeError("distributed.database_url is not set (embedded mode has no shared database)")
    with _LOCK:
        if url not in _ENGINES:
            parsed = make_url(url)
            if parsed.drivername == "postgresql":
                parsed = parsed.set(drivername="postgresql+psycopg")
            made = create_engine(parsed, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW, pool_pre_ping=True,
                                 pool_timeout=POOL_WAIT_S, connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S})
            create_schema(made)
            _ENGINES[url] = made
        return _ENGINES[url]


def create_schema(made: Engine) -> None:
    """Create the missing tables; replicas and workers starting together are safe."""
    with made.begin() as connection:
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        for table in metadata.sorted_tables:
            connection.execute(CreateTable(table, if_not_exists=True))
