"""Where embedded and distributed state part ways: the one place that picks each store's backend from the settings.

Embedded (one machine, `make serve`): SQLite files under `settings.data_dir`. Distributed
(`settings.distributed.enabled`): PostgreSQL shared by the replicas, bulky files on the shared volume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.settings import Settings
from state.dependency_health import shared_volume
from state.pacs_jobs import JobStore, PacsJobs, job_store_path
from state.pacs_jobs_pg import PostgresJobStore
from state.pg_tasks import PostgresTaskStore
from state.request_cache import RequestCache, cache_directory
from state.tasks import TaskStates, TaskStore, task_store_path

if TYPE_CHECKING:
    from state.job_queue import MriQueue


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


def open_mri_queue(settings: Settings, tasks: TaskStates) -> MriQueue | None:
    """This API worker's side of the shared MRI job queue (distributed); None embedded, where a task runs in the API
    worker that accepted it. procrastinate is imported only where it is used."""
    if not settings.distributed.enabled:
        return None
    from state.job_queue import MriQueue, replica_name

    distributed = settings.distributed
    return MriQueue(tasks, distributed.database_url or "", replica_name(distributed.replica_id),
                    settings.shutdown_grace_seconds)


def prepare_job_queue(settings: Settings) -> None:
    """Once per server start, before the workers: the shared job queue's tables (distributed; nothing embedded)."""
    if settings.distributed.enabled:
        from state.job_queue import prepare_database

        prepare_database(settings.distributed.database_url or "")


def embedded_task_store(settings: Settings) -> TaskStore | None:
    """The local task store whose active tasks a killed server left behind are to be failed at start (embedded);
    None distributed, where the shared queue hands them to another run."""
    return None if settings.distributed.enabled else TaskStore(task_store_path(settings.data_dir))


def open_request_cache(settings: Settings) -> RequestCache:
    """The cache of prepared inputs for `/xai/explain` and `/feedback`: on the shared volume with replicas (its I/O
    guarded by the volume's breaker: 503 while it is unreachable), else under the data directory."""
    directory = cache_directory(settings)
    volume = shared_volume(settings.distributed.shared_dir) if settings.distributed.enabled and \
        settings.distributed.shared_dir else None
    return RequestCache(directory, settings.xai_cache_entries, settings.xai_cache_ttl_seconds,
                        settings.xai_cache_max_bytes, volume)
