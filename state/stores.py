"""Where embedded and distributed state part ways: the one place that picks each store's backend from the settings.

Embedded (one machine, `make serve`): SQLite files under `settings.data_dir`. Distributed
(`settings.distributed.enabled`): PostgreSQL shared by the replicas, bulky files on the shared volume.
"""

from __future__ import annotations

from core.settings import Settings
from state.pg_tasks import PostgresTaskStore
from state.tasks import TaskStates, TaskStore, task_store_path


def open_task_store(settings: Settings) -> TaskStates:
    """The MRI task store: PostgreSQL shared by the replicas (distributed), else the local SQLite file."""
    if settings.distributed.enabled:
        return PostgresTaskStore.from_settings(settings)
    return TaskStore(task_store_path(settings.data_dir))
