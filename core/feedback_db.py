"""The feedback database through SQLAlchemy Core: embedded SQLite by default, PostgreSQL by URL in production.

Both API workers open the same database. SQLite runs in WAL mode with a busy timeout (one writer at a time, readers
never blocked); PostgreSQL gives each record its own transaction. Schema creation is idempotent and serialised, so
the workers may start together.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    make_url,
    text,
)
from sqlalchemy.schema import CreateIndex, CreateTable

from core.shared_db import PG_CONNECT_TIMEOUT_S, database_health, guard_engine

SQLITE_FILE = "feedback.sqlite3"
SQLITE_BUSY_TIMEOUT_S = 30
WAL_SWITCH_ATTEMPTS = 100
# pg_advisory_xact_lock key that serialises schema creation between workers (any constant unique to this schema).
SCHEMA_LOCK_KEY = 0x4E4E_FB01
SUPPORTED_DIALECTS = ("sqlite", "postgresql")

metadata = MetaData()

feedback_records = Table(
    "feedback", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("request_id", String(128), nullable=False),
    Column("model_id", String(64), nullable=False),
    Column("model_version", String(256), nullable=False),
    Column("input_sha256", String(64), nullable=False),
    Column("predicted", String(64)),
    Column("verdict", String(16), nullable=False),
    Column("corrected_label", String(64)),
    Column("reviewer_id", String(64), nullable=False),
    Column("comment", Text, nullable=False, server_default=""),
    Column("input_file", String(128), nullable=False),
    CheckConstraint("verdict IN ('accept', 'correct', 'reject')", name="feedback_verdict"),
    Index("ix_feedback_model_id", "model_id"),
    sqlite_autoincrement=True,  # ids are never reused, as in an append-only log
)

# The reviewed mask of a segmentation record ('correct': the doctor's; 'accept': the model's), named like an input
# file. A table of its own, so databases written before masks were reviewed need no migration.
feedback_masks = Table(
    "feedback_masks", metadata,
    Column("feedback_id", Integer, ForeignKey("feedback.id"), primary_key=True),
    Column("mask_file", String(128), nullable=False),
)

# Server databases keep the de-identified inputs themselves: every API host and the fine-tuning job reach them
# through the URL alone, and a record commits together with its input. Keyed by `feedback_records.input_file` (and
# `feedback_masks.mask_file`).
feedback_inputs = Table(
    "feedback_inputs", metadata,
    Column("input_file", String(128), primary_key=True),
    Column("npz", LargeBinary, nullable=False),
)


def default_database_url(directory: Path) -> str:
    """The embedded database: an SQLite file in the feedback directory."""
    return f"sqlite:///{(directory / SQLITE_FILE).resolve()}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Put the database in WAL mode (persistent in the file). Switching journal modes answers "database is locked"
    at once, without SQLite's busy handler, when another worker switches it at the same moment: retry briefly."""
    cursor = dbapi_connection.cursor()
    try:
        for attempt in range(WAL_SWITCH_ATTEMPTS):
            try:
                if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    cursor.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == WAL_SWITCH_ATTEMPTS - 1:
                    raise
                time.sleep(0.05)
    finally:
        cursor.close()


def open_engine(database_url: str) -> Engine:
    """An engine for `sqlite:///<file>` or `postgresql://…` (driven by psycopg 3), schema created if missing."""
    url = make_url(database_url)
    if url.get_backend_name() not in SUPPORTED_DIALECTS:
        raise ValueError(f"feedback database must be one of {SUPPORTED_DIALECTS}, not {url.get_backend_name()}")
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")  # SQLAlchemy's default would be psycopg2
    sqlite = url.get_backend_name() == "sqlite"
    engine = create_engine(url, pool_pre_ping=not sqlite, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S} if sqlite
                           else {"connect_timeout": PG_CONNECT_TIMEOUT_S})
    if sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    else:  # an unreachable server: 503 at once while its breaker is open (core.dependency_health)
        guard_engine(engine, database_health(database_url))
    create_schema(engine)
    return engine


def create_schema(engine: Engine) -> None:
    """Create missing tables and indexes; concurrent callers (the API workers starting together) are safe."""
    tables = [feedback_records, feedback_masks] + ([] if engine.dialect.name == "sqlite" else [feedback_inputs])
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            # IF NOT EXISTS alone still races on PostgreSQL's catalog; the lock makes the second worker wait.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        for table in tables:
            connection.execute(CreateTable(table, if_not_exists=True))
            for index in table.indexes:
                connection.execute(CreateIndex(index, if_not_exists=True))
