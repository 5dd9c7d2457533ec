"""Which version each replica's runner serves, so that `/update_model` can say which replicas have switched.

Distributed mode only: every runner writes its row (`neuronova_replica_models`: replica, model, served tag,
generation, pending version, load error) after each switch attempt and on each poll of the registry (1 s), stamped
with PostgreSQL's clock. A replica whose row was written within `LIVE_WITHIN_S` (by the database's clock: no skew
between machines) is live; a replica that stopped is dropped from answers once its row ages out. Embedded mode has
one server, whose runner is asked directly (`pipelines/lifecycle.py`).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert

from state import shared_db
from core.settings import get_settings

LIVE_WITHIN_S = 5.0
"""A replica whose runner wrote its row this recently is live (its runner polls every second)."""
POLL_INTERVAL_S = 0.2


@dataclass(frozen=True)
class ReplicaModel:
    """One replica's runner of one model: what it serves, what it was asked for and could not load yet, and why."""

    replica: str
    tag: str | None
    generation: int
    pending: str | None
    error: str | None


def replica_id() -> str:
    """This replica's name: the configured `distributed.replica_id`, else the host name (a pod, a container)."""
    return get_settings().distributed.replica_id or socket.gethostname()


def report(model_id: str, served: ReplicaModel, database_url: str | None = None) -> None:
    """Write (or refresh) this replica's row for `model_id` (in the configured shared database by default)."""
    table = shared_db.replica_models
    values = {"tag": served.tag, "generation": served.generation, "pending": served.pending,
              "error": served.error, "updated_at": func.now()}
    with shared_db.engine(database_url).begin() as connection:
        connection.execute(insert(table).values(replica_id=served.replica, model_id=model_id, **values)
                           .on_conflict_do_update(index_elements=[table.c.replica_id, table.c.model_id], set_=values))


def live(model_id: str, within_s: float = LIVE_WITHIN_S) -> list[ReplicaModel]:
    """The rows of `model_id` written within `within_s` seconds, by replica name."""
    table = shared_db.replica_models
    fresh = table.c.updated_at > func.now() - text("make_interval(secs => :within)").bindparams(within=within_s)
    with shared_db.engine().connect() as connection:
        rows = connection.execute(select(table.c.replica_id, table.c.tag, table.c.generation, table.c.pending,
                                         table.c.error)
                                  .where(table.c.model_id == model_id, fresh).order_by(table.c.replica_id)).all()
    return [ReplicaModel(row.replica_id, row.tag, row.generation, row.pending, row.error) for row in rows]


def settled(model_id: str, target: str, wait_s: float) -> list[ReplicaModel]:
    """The live replicas of `model_id` once each serves `target` or has failed to load it (pending, with its
    error), or as they are after `wait_s` seconds. Blocking: call it in a thread."""
    deadline = time.monotonic() + wait_s
    while True:
        replicas = live(model_id)
        if all(r.tag == target or (r.pending == target and r.error) for r in replicas) or time.monotonic() >= deadline:
            return replicas
        time.sleep(POLL_INTERVAL_S)
