"""Test session set-up: a private BentoML home holding the demo models, imported from demo_models/ (nothing trains);
every process the session starts carries the session's tag, and one still alive when the session ends fails it."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IN_PROCESS_SECRET = "inprocess-secret-0123456789-abcdefghij"
SESSION_TAG = "NEURONOVA_TEST_SESSION"
"""In the environment of the test process, so of every process started by it (servers, their workers, Orthanc,
PostgreSQL, haproxy) wherever it ends up in the process tree."""
os.environ[SESSION_TAG] = uuid.uuid4().hex
# Before anything imports the service (whose settings are read once per process): one data dir and JWT secret
# for every in-process test, whichever module imports the service first.
os.environ.setdefault("BENTOML_HOME", str(ROOT / ".bentoml-test"))
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
os.environ.setdefault("NEURONOVA_DATA_DIR", tempfile.mkdtemp(prefix="neuronova-test-data-"))
os.environ.setdefault("NEURONOVA_AUTH__SECRET", IN_PROCESS_SECRET)

import psutil  # noqa: E402
import pytest  # noqa: E402

from bench.harness import kill_processes, tagged_processes  # noqa: E402

# `postgres_server`: a real PostgreSQL on loopback; `replicas`: two replicas behind haproxy sharing it (issue #14)
pytest_plugins = ["tests.postgres", "tests.replicas"]


@pytest.fixture(scope="session")
def demo_models() -> dict[str, str]:
    """Make sure every demo model is in the test store (imports the shipped exports it lacks: seconds)."""
    from training_export.demo import ensure_demo_models

    return ensure_demo_models()


@pytest.fixture(scope="session")
def ct_model() -> str:
    """The demo CT classifier in the test store (imported on first use)."""
    from training_export.demo import ensure_demo_models

    return ensure_demo_models(["neuronova-ct"])["neuronova-ct"]


@pytest.fixture(scope="session")
def inprocess_client(demo_models: dict[str, str], request: pytest.FixtureRequest):
    """NeuroNova's ASGI app in this process (runners too), once per session: BentoML registers its Prometheus
    metrics per app, so a second app in one process fails. Carries a valid clinician token. The service builds its
    feedback store from its settings, on PostgreSQL where the session can run it (tests/postgres.py)."""
    import time

    import jwt

    from _bentoml_impl.tasks import Sqlite3Store
    from starlette.testclient import TestClient

    from api.tasks import bentoml_result_store_path
    from core.settings import get_settings
    from tests.postgres import service_database_url

    database_url = service_database_url(request)
    if database_url:
        os.environ["NEURONOVA_FEEDBACK__DATABASE_URL"] = database_url  # for the session: the finetune CLI reads it too
        get_settings.cache_clear()
    from service import NeuroNova

    Sqlite3Store.init_db(str(bentoml_result_store_path()))
    token = jwt.encode({"sub": "tests", "exp": int(time.time()) + 3600}, IN_PROCESS_SECRET, algorithm="HS256")
    with TestClient(NeuroNova.to_asgi(), headers={"Authorization": f"Bearer {token}"}) as client:
        yield client


PYTHON_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
"""Started by Python itself for this process (shared memory, semaphores); each ends when its pipe from this process
closes, i.e. with it."""


def _python_helper_of_this_process(process: psutil.Process) -> bool:
    try:
        return process.ppid() == os.getpid() and any(helper in " ".join(process.cmdline()) for helper in PYTHON_HELPERS)
    except psutil.Error:
        return False


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when a process the session started outlived it (after every fixture stopped its servers), and
    kill it, so no test leaves a server, an orphaned worker or a helper behind."""
    ours = {os.getpid(), *(parent.pid for parent in psutil.Process().parents())}
    left = [p for p in tagged_processes(SESSION_TAG, os.environ[SESSION_TAG])
            if p.pid not in ours and not _python_helper_of_this_process(p)]
    if not left:
        return
    described = []
    for process in left:
        try:
            described.append(f"pid {process.pid} (parent {process.ppid()}): {' '.join(process.cmdline())[:200]}")
        except psutil.Error:
            described.append(f"pid {process.pid}")
    kill_processes(left)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"FAILED: {len(left)} process(es) started by the tests outlived them (now killed):",
                            red=True)
        for line in described:
            reporter.write_line(f"  {line}")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
