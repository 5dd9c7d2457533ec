"""The PostgreSQL connection budget (`state.shared_db`): at the autoscaler's maximum the replicas fit PostgreSQL's
default `max_connections`, and one API worker process — task store, job queue, rate limits, feedback, registry, many
threads at once — holds no more connections than its budget, each named by replica and role in `pg_stat_activity`."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import psycopg
import pytest
import yaml

from api.limits import SharedWindows
from core.settings import get_settings
from state import active_models, shared_db
from state.feedback import FeedbackStore
from state.job_queue import MriQueue, prepare_database
from state.pg_tasks import PostgresTaskStore
from tests.pg_activity import ConnectionSamples, connections
from tests.unit.core.conftest import REPLICA

K8S = Path(__file__).resolve().parents[3] / "deploy" / "k8s"
API = f"neuronova:{REPLICA}:api"
THREADS = 24
CALLS_PER_THREAD = 15
QUEUED_TASKS = 6
TASKS_DEADLINE_S = 120.0


def hpa_max_replicas() -> int:
    return int(yaml.safe_load((K8S / "hpa.yaml").read_text())["spec"]["maxReplicas"])


def deployed_environment() -> set[str]:
    """The environment variable names the pod gets (its ConfigMap's keys and the container's own)."""
    names = set(yaml.safe_load((K8S / "configmap.yaml").read_text())["data"])
    for container in yaml.safe_load((K8S / "deployment.yaml").read_text())["spec"]["template"]["spec"]["containers"]:
        names |= {entry["name"] for entry in container.get("env", [])}
    return names


def service_processes() -> tuple[int, int]:
    """(API workers, runner processes) of one replica, as the service declares them."""
    from service import NeuroNova

    runners = [dependency.on.config.get("workers", 1) for dependency in NeuroNova.dependencies.values()]
    assert all(isinstance(workers, int) for workers in runners), runners
    return NeuroNova.config["workers"], sum(runners)


def test_the_replicas_at_the_autoscaler_s_maximum_fit_postgresql_s_default_max_connections() -> None:
    assert not {name for name in deployed_environment() if name.startswith("BENTOML_CONFIG")}, \
        "a BentoML configuration in the manifests may change the worker counts this budget is computed for"
    api_workers, runner_processes = service_processes()
    per_replica = shared_db.replica_budget(api_workers, runner_processes)
    at_maximum = hpa_max_replicas() * per_replica
    available = shared_db.POSTGRES_MAX_CONNECTIONS - shared_db.POSTGRES_RESERVED_CONNECTIONS
    print(f"\n{api_workers} API workers x {shared_db.process_budget('api')} + {runner_processes} runners x "
          f"{shared_db.process_budget('runner')} = {per_replica} per replica; x {hpa_max_replicas()} replicas = "
          f"{at_maximum} of {available}")
    assert at_maximum <= available


def test_one_pool_bounds_many_threads_of_every_store(api_worker: str) -> None:
    """Task store, rate limits, feedback and registry share the process's one pool: many threads at once never hold
    more than its size, and every call succeeds (waiting its turn)."""
    settings = get_settings()
    tasks = PostgresTaskStore.from_settings(settings)
    feedback = FeedbackStore.from_settings(settings)
    windows = SharedWindows(api_worker)
    bucket = f"budget-{uuid.uuid4().hex[:8]} /model_info"

    def work(index: int) -> None:
        for call in range(CALLS_PER_THREAD):
            task_id = f"t{index}-{call}"
            tasks.create(task_id, f"r{index}", "mri_segmentation")
            assert tasks.get(task_id).status == "pending"
            assert asyncio.run(windows.admit(bucket, THREADS * CALLS_PER_THREAD)) is None
            assert feedback.verdict_counts("ct_classification", "v1") == {}
            assert active_models.registry_stamp() == 0.0

    with ConnectionSamples(api_worker) as seen, ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(work, range(THREADS)))
    with psycopg.connect(api_worker) as db:
        counted = db.execute("SELECT hits FROM neuronova_rate_limits WHERE bucket = %s", (bucket,)).fetchall()
    assert sum(hits for (hits,) in counted) == THREADS * CALLS_PER_THREAD  # no count failed open
    assert tasks.backlog().counts["pending"] == THREADS * CALLS_PER_THREAD
    print(f"\npeak {seen.peak(API)} connections over {len(seen.samples)} samples; "
          f"pool size {shared_db.POOL_SIZE['api']}")
    assert seen.names() <= {API} and 1 <= seen.peak(API) <= shared_db.POOL_SIZE["api"]
    assert connections(api_worker)[API] == shared_db.POOL_SIZE["api"]  # the pool keeps its connections, no more


def wait_for(condition: Callable[[], bool], deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {deadline_s} s"
        time.sleep(0.05)


def test_an_api_worker_running_queued_tasks_stays_within_its_budget(api_worker: str) -> None:
    """The job queue (its pool, its LISTEN connection) beside the stores' pool, jobs running while threads poll:
    the worker's connections never exceed `process_budget('api')`."""
    prepare_database(api_worker)
    tasks = PostgresTaskStore.from_settings(get_settings())
    queue = MriQueue(tasks, api_worker, REPLICA, shutdown_grace_s=4.0)

    async def run(ref: str, params: dict) -> None:
        await asyncio.to_thread(tasks.report, ref, "inference", 50)
        await asyncio.to_thread(tasks.complete, ref, {"ran": ref, "index": params["index"]})

    def all_completed(task_ids: list[str]) -> bool:
        return all(tasks.get(task_id).status == "completed" for task_id in task_ids)

    async def scenario(task_ids: list[str]) -> None:
        await queue.start(run)
        loop = asyncio.get_running_loop()
        try:
            for index, task_id in enumerate(task_ids):
                await asyncio.to_thread(tasks.create, task_id, None, "mri_segmentation")
                await queue.submit(task_id, [], {"index": index})
            with ThreadPoolExecutor(THREADS) as polling:  # clients polling meanwhile (the loop's own threads stay free)
                await asyncio.gather(*(loop.run_in_executor(polling, wait_for, lambda: all_completed(task_ids),
                                                            TASKS_DEADLINE_S, "completed") for _ in range(THREADS)))
        finally:
            await queue.close()

    task_ids = [f"queued-{index}" for index in range(QUEUED_TASKS)]
    with ConnectionSamples(api_worker) as seen:
        asyncio.run(scenario(task_ids))
    assert [tasks.get(task_id).result["index"] for task_id in task_ids] == list(range(QUEUED_TASKS))
    print(f"\npeak {seen.peak(API)} connections over {len(seen.samples)} samples; "
          f"budget {shared_db.process_budget('api')}")
    assert seen.names() <= {API} and shared_db.POOL_SIZE["api"] < seen.peak(API) <= shared_db.process_budget("api")


@pytest.mark.parametrize(("service_type", "role"), [("entry_service", "api"), ("service", "runner"), (None, "tool")])
def test_a_process_s_role_is_the_kind_of_bentoml_worker_it_is(monkeypatch, service_type: str | None,
                                                              role: str) -> None:
    monkeypatch.setattr(bentoml.server_context, "service_type", service_type)
    assert shared_db.process_role() == role and shared_db.application_name().endswith(f":{role}")


def test_connections_name_their_replica_and_role_within_postgresql_s_limit(monkeypatch) -> None:
    monkeypatch.setenv("NEURONOVA_DISTRIBUTED__REPLICA_ID", "neuronova-7d9f8c6b5-x2k4q" * 4)
    get_settings.cache_clear()
    try:
        name = shared_db.application_name("runner")
        options = shared_db.libpq_options("api")
    finally:
        get_settings.cache_clear()
    assert name.startswith("neuronova:neuronova-7d9f8c6b5-x2k4q") and name.endswith(":runner")
    assert len(name.encode()) == shared_db.APPLICATION_NAME_BYTES
    assert options["connect_timeout"] == shared_db.PG_CONNECT_TIMEOUT_S and options["application_name"].endswith(":api")


def test_the_arbiter_s_start_up_work_is_named_start_and_holds_no_connection_afterwards(api_worker: str,
                                                                                        monkeypatch) -> None:
    monkeypatch.setattr(bentoml.server_context, "service_type", None)  # the arbiter: no BentoML worker
    start = f"neuronova:{REPLICA}:start"
    with shared_db.start_up():
        PostgresTaskStore.from_settings(get_settings()).create("t-start", "r", "mri_segmentation")
        assert connections(api_worker)[start] == shared_db.POOL_SIZE["start"]  # pooled meanwhile, named `start`
    wait_for(lambda: connections(api_worker)[start] == 0, 30.0, "the start-up pool closed")
    assert shared_db.process_role() == "tool"


def test_the_readiness_probe_of_the_database_borrows_from_the_pool(api_worker: str, monkeypatch) -> None:
    """`/readyz` probes the database every two seconds (the balancer asks every second): on a pooled connection, not
    a new one, so a replica stays within its budget while it is checked."""
    health = shared_db.database_health(api_worker)
    health.ready_probe()  # the pool's first connection
    opened: list[str] = []
    connect = psycopg.connect
    monkeypatch.setattr(psycopg, "connect", lambda *args, **kwargs: opened.append("new") or connect(*args, **kwargs))
    for _ in range(20):
        health.ready_probe()
    assert opened == []
