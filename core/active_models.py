"""Which store tag each model route serves now: a small JSON file in the data dir shared by every process.

`/update_model` writes it; every runner worker watches it and swaps models without a restart; the history makes
rollback a switch back to the previous tag. The file outlives restarts, so a switched version stays switched.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path

from core.settings import get_settings

_LOCK = threading.Lock()
HISTORY_LENGTH = 20


def registry_path() -> Path:
    return Path(get_settings().data_dir) / "active_models.json"


def _read(path: Path) -> dict[str, dict]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def active_tag(model_id: str, default: str) -> str:
    """The tag `model_id` should serve: the last switch recorded, else the configured default."""
    return _read(registry_path()).get(model_id, {}).get("tag", default)


def previous_tag(model_id: str) -> str | None:
    """The tag served before the current one (the rollback target), if any."""
    history = _read(registry_path()).get(model_id, {}).get("history", [])
    return history[-1]["tag"] if history else None


def record_switch(model_id: str, new_tag: str, old_tag: str) -> None:
    """Make `new_tag` the active tag of `model_id`, remembering `old_tag` (atomic replace of the file)."""
    path = registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _LOCK:
        entries = _read(path)
        entry = entries.get(model_id, {"history": []})
        history = [h for h in entry.get("history", []) if h["tag"] != new_tag] + [
            {"tag": old_tag, "until": datetime.now(timezone.utc).isoformat()}
        ]
        entries[model_id] = {"tag": new_tag, "history": history[-HISTORY_LENGTH:]}
        handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".active_models.")
        with os.fdopen(handle, "w") as temp:
            json.dump(entries, temp, indent=2)
        os.replace(temp_name, path)


def registry_mtime() -> float:
    """Modification time of the registry (0 when absent): cheap to poll for changes."""
    try:
        return registry_path().stat().st_mtime
    except FileNotFoundError:
        return 0.0
