"""Which store tag each model route serves now, with the history that makes rollback a switch back.

Embedded (one machine): a small JSON file in the data dir shared by every process. Distributed (replicas): a row per
model id in the shared PostgreSQL (`state.shared_db`), so a switch through one replica reaches every replica's runners.
`/update_model` writes it; every runner worker polls `registry_stamp()` (a file's mtime, or the rows' summed
generations: one indexed query) and swaps models without a restart. The registry outlives restarts, so a switched
version stays switched.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert

from state import shared_db
from core.settings import get_settings

_LOCK = threading.Lock()
HISTORY_LENGTH = 20


def _distributed() -> bool:
    return get_settings().distributed.enabled


def registry_path() -> Path:
    return Path(get_settings().data_dir) / "active_models.json"


def _read(path: Path) -> dict[str, dict]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _entry(model_id: str) -> dict:
    if not _distributed():
        return _read(registry_path()).get(model_id, {})
    table = shared_db.active_models
    with shared_db.engine().connect() as connection:
        row = connection.execute(select(table.c.tag, table.c.history).where(table.c.model_id == model_id)).first()
    return {"tag": row.tag, "history": row.history} if row else {}


def active_tag(model_id: str, default: str) -> str:
    """The tag `model_id` should serve: the last switch recorded, else the configured default."""
    return _entry(model_id).get("tag", default)


def previous_tag(model_id: str) -> str | None:
    """The tag served before the current one (the rollback target), if any."""
    history = _entry(model_id).get("history", [])
    return history[-1]["tag"] if history else None


def _switched(entry: dict, new_tag: str, old_tag: str) -> dict:
    history = [h for h in entry.get("history", []) if h["tag"] != new_tag] + [
        {"tag": old_tag, "until": datetime.now(timezone.utc).isoformat()}
    ]
    return {"tag": new_tag, "history": history[-HISTORY_LENGTH:]}


def record_switch(model_id: str, new_tag: str, old_tag: str) -> None:
    """Make `new_tag` the active tag of `model_id`, remembering `old_tag` (atomically: a file replace, or one
    transaction holding the row's lock)."""
    if _distributed():
        _record_switch_shared(model_id, new_tag, old_tag)
        return
    path = registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _LOCK:
        entries = _read(path)
        entries[model_id] = _switched(entries.get(model_id, {}), new_tag, old_tag)
        handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".active_models.")
        with os.fdopen(handle, "w") as temp:
            json.dump(entries, temp, indent=2)
        os.replace(temp_name, path)


def _record_switch_shared(model_id: str, new_tag: str, old_tag: str) -> None:
    table = shared_db.active_models
    with shared_db.engine().begin() as connection:
        # Create the row if absent, then lock it: two replicas switching at once apply one after the other.
        connection.execute(insert(table).values(model_id=model_id, tag=old_tag, history=[], generation=0)
                           .on_conflict_do_nothing())
        row = connection.execute(select(table.c.tag, table.c.history, table.c.generation)
                                 .where(table.c.model_id == model_id).with_for_update()).one()
        switched = _switched({"history": row.history}, new_tag, old_tag)
        connection.execute(table.update().where(table.c.model_id == model_id)
                           .values(tag=switched["tag"], history=switched["history"], generation=row.generation + 1))


def registry_stamp() -> float:
    """Changes whenever any switch is recorded (0 before the first): cheap to poll."""
    if _distributed():
        with shared_db.engine().connect() as connection:
            return float(connection.execute(select(func.coalesce(func.sum(shared_db.active_models.c.generation), 0)))
                         .scalar_one())
    try:
        return registry_path().stat().st_mtime
    except FileNotFoundError:
        return 0.0
