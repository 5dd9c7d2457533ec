"""Where embedded and distributed state part ways: the one place that picks each store's backend from the settings.

Embedded (one machine, `make serve`): SQLite files under `settings.data_dir`. Distributed
(`settings.distributed.enabled`): PostgreSQL shared by the replicas, bulky files on the shared volume.
"""

from __future__ import annotations

from core.settings import Settings
from state.pacs_jobs import JobStore, PacsJobs, job_store_path
from state.pacs_jobs_pg import PostgresJobStore
from state.pg_tasks import PostgresTaskStore
from state.tasks import TaskStates, TaskStore, task_store_path


def open_task_store(settings: Settings) -> TaskStates:
    """The MRI task store: PostgreSQL shared by the replicas (distributed), else the local SQLite file."""
    if settings.distributed.enabled:
        return PostgresTaskStore.from_settings(settings)
    return TaskStore(task_store_path(settings.data_dir))


def open_job_store(settings: Settings) -> PacsJobs:
    """The PACS job store: PostgreSQL shared by every replica (results on the shared volume), else SQLite under this
    server's data directory."""
    distributed = settings.distributed
    if distributed.enabled:
        if not distributed.shared_dir:
            raise ValueError("NEURONOVA_DISTRIBUTED__SHARED_DIR is required with NEURONOVA_DISTRIBUTED__DATABASE_URL")
        return PostgresJobStore(distributed.database_url or "", distributed.shared_dir, distributed.replica_id)
    return JobStore(job_store_path(settings.data_dir))
