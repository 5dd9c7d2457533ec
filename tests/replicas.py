"""Two replicas of `bentoml serve service:NeuroNova` behind haproxy on loopback, sharing only a real PostgreSQL database
and a shared directory: the harness of the `replicas` tests (issue #14, "any replica answers anything").

Each replica has its own `BENTOML_HOME` (a copy of the test model store) and its own data directory, and runs in
distributed mode (`NEURONOVA_DISTRIBUTED__DATABASE_URL`, `__SHARED_DIR`, a distinct `__REPLICA_ID`). haproxy (the
Debian package) balances round-robin over both, answers with the replica's name in `X-Replica`, and checks `/readyz`
every second, so a stopped replica leaves the rotation. Every process is started and stopped by PID (its own process
group). Where haproxy is missing the tests skip with the reason, except under CI, where they fail (`.ci/run` installs it).

Every replica runs the PACS connection (`NEURONOVA_PACS__CONFIG`: the shipped MR rule, every MR result object) against
an Orthanc on a loopback port reserved for it (`ReplicaSet.pacs_port`); the PACS test starts that Orthanc itself
(tests/scaleout/test_replicas_pacs.py), the other tests never notify a study, so they need none.

Use the session fixture `replicas` (a `ReplicaSet`); a test that kills, pauses or stops a replica brings it back
(`restart`, `resume`) before it ends, so the next test finds both serving.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from bench.harness import BENTOML_SERVE, ROOT, free_port, start_process, stop_group, wait_ready
from tests.http.conftest import make_token, server_env
from tests.orthanc import service_config
from tests.postgres import PostgresServer
from tests.prerequisites import unavailable

HAPROXY = "haproxy"
READY_TIMEOUT_S = 300.0
"""Two replicas start side by side on a shared 2-core machine: model loading of both takes minutes at worst."""
API_WORKERS = 1
"""API workers per replica (the service's default is 2): one keeps two replicas within CI's memory."""

SHUTDOWN_GRACE_S = 2.0
RATE_LIMITED_ROUTE = "/model_info"
RATE_LIMITED_PER_MINUTE = 20
"""One route with a low limit (per client, one limit across the replicas in distributed mode) for the rate-limit test;
every other route keeps the HTTP tests' limit that never binds."""
PACS_MODELS = ("mri_segmentation",)
"""The replicas' PACS rules: MR only (a CT rule would have every replica's CT runner load Grad-CAM at start)."""

HAPROXY_CONFIG = """\
global
    maxconn 512
defaults
    mode http
    timeout connect 5s
    timeout client 600s
    timeout server 600s
frontend neuronova
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /readyz
    http-response set-header X-Replica %[srv_name]
{servers}
"""


def require_haproxy() -> str:
    """haproxy's path; otherwise skip the test, or fail it under CI."""
    found = shutil.which(HAPROXY) or shutil.which(HAPROXY, path="/usr/sbin:/usr/local/sbin")
    if found:
        return found
    reason = "haproxy is not installed (Debian: apt-get install haproxy); the replicas tests need it as their balancer"
    unavailable("haproxy", reason)


@dataclass
class Replica:
    """One `bentoml serve` of the set, on a fixed loopback port (so the balancer finds it again after a restart)."""

    name: str
    port: int
    home: Path
    data_dir: Path
    log_path: Path
    env: dict[str, str]
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The arbiter's pid (the leader of the replica's process group)."""
        assert self.process is not None, f"replica {self.name} is not running"
        return self.process.pid

    def start(self) -> None:
        """Start the server (returns at once; `wait_ready` waits for it)."""
        assert self.process is None or self.process.poll() is not None, f"replica {self.name} already runs"
        self.process = start_process(BENTOML_SERVE, self.env, self.log_path, self.port)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        assert self.process is not None
        wait_ready(self.process, self.url, self.log_path, timeout_s=timeout_s)

    def processes(self) -> list[psutil.Process]:
        """Every live process of the replica: arbiter, API workers, runners (BentoML starts each worker in its own
        session, so they are found by the replica's BENTOML_HOME in their environment, not by process group)."""
        found = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if process.environ().get("BENTOML_HOME") == str(self.home):
                    found.append(process)
        return found

    def signal(self, signum: int) -> None:
        """Send `signum` to every process of the replica."""
        for process in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signum)

    def kill(self, processes: list[psutil.Process] | None = None) -> None:
        """SIGKILL every process of the replica at once (a node lost), and wait until all are gone. `processes`: the
        replica's processes listed beforehand (`processes()` reads every process's environment: slow on a busy host),
        for a kill at a precise moment."""
        processes = self.processes() if processes is None else processes
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(processes, timeout=30)
        assert self.process is not None
        self.process.wait(timeout=30)

    def pause(self) -> None:
        """SIGSTOP every process (a replica frozen: no heartbeats, no progress, its connections held)."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def stop(self, grace_s: float = 30.0) -> float:
        """SIGTERM to the arbiter, as Kubernetes stops a pod; SIGKILL whatever of the replica is left after `grace_s`.
        The seconds until its last process was gone."""
        assert self.process is not None
        started = time.monotonic()
        self.resume()
        processes = self.processes()
        stop_group(self.process, grace_s)
        _, alive = psutil.wait_procs(processes, timeout=max(0.0, grace_s - (time.monotonic() - started)))
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        return time.monotonic() - started

    def restart(self) -> None:
        """Stop (if running), start and wait until ready."""
        if self.process is not None and self.process.poll() is None:
            self.stop()
        self.start()
        self.wait_ready()

    def rss_mib(self) -> float:
        """Resident memory of the replica's process tree, MiB."""
        total = 0
        for process in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += process.memory_info().rss
        return total / 2**20


@dataclass
class ReplicaSet:
    """Two replicas behind haproxy, sharing `database_url` (PostgreSQL) and `shared_dir`."""

    balancer_url: str
    replicas: list[Replica]
    database_url: str
    shared_dir: Path
    pacs_port: int
    """Where the replicas' PACS connection expects an Orthanc's HTTP port (DICOMweb under `/dicom-web`)."""
    token: str = field(default_factory=make_token)

    @property
    def headers(self) -> dict[str, str]:
        """A clinician's bearer token, as Django sends it."""
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {make_token(role='admin')}"}

    def client(self, target: str | Replica | None = None, timeout: float = 120.0) -> httpx.Client:
        """An HTTP client with the clinician token, to the balancer (default), a replica, or a replica by name."""
        replica = self.replica(target) if isinstance(target, str) else target
        return httpx.Client(base_url=replica.url if replica else self.balancer_url, headers=self.headers,
                            timeout=timeout)

    def replica(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)

    def other(self, replica: Replica | str) -> Replica:
        """The replica that is not `replica`."""
        name = replica if isinstance(replica, str) else replica.name
        return next(r for r in self.replicas if r.name != name)

    def ensure_serving(self) -> None:
        """Bring back any replica a test stopped, killed or paused (for the next test)."""
        for replica in self.replicas:
            replica.resume()
            if replica.process is None or replica.process.poll() is not None:
                replica.start()
        for replica in self.replicas:
            replica.wait_ready()
        wait_balanced(self.balancer_url, {r.name for r in self.replicas})


def wait_balanced(url: str, names: set[str], timeout_s: float = 30.0) -> None:
    """Return once the balancer has routed to every replica in `names` (its health checks have seen them up)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while seen != names:
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(f"{url}/readyz", timeout=5)
            if response.status_code == 200:
                seen.add(response.headers.get("x-replica", ""))
        assert time.monotonic() < deadline, f"balancer routed only to {seen} of {names}"
        time.sleep(0.2)


def replica_env(name: str, home: Path, data_dir: Path, database_url: str, shared_dir: Path) -> dict[str, str]:
    """The environment of one replica: the HTTP tests' instance settings plus distributed mode."""
    return {
        **server_env(data_dir, database_url),
        "BENTOML_HOME": str(home),
        "BENTOML_CONFIG_OPTIONS": f"services.neuronova.workers={API_WORKERS}",
        "NEURONOVA_DISTRIBUTED__DATABASE_URL": database_url,
        "NEURONOVA_DISTRIBUTED__SHARED_DIR": str(shared_dir),
        "NEURONOVA_DISTRIBUTED__REPLICA_ID": name,
        "NEURONOVA_RATE_LIMIT__PER_ROUTE_PER_MINUTE": json.dumps({RATE_LIMITED_ROUTE: RATE_LIMITED_PER_MINUTE}),
        # A task running at SIGTERM gets half the grace (1 s) before it is handed back: less than the test study's
        # inference (~3 s on a warm, quiet runner), so a restart always finds the task running to hand back.
        "NEURONOVA_SHUTDOWN_GRACE_SECONDS": str(SHUTDOWN_GRACE_S),
    }


@contextlib.contextmanager
def haproxy(port: int, backends: dict[str, int], folder: Path) -> Iterator[subprocess.Popen]:
    """haproxy in the foreground (`-db`) on 127.0.0.1:`port`, round-robin over `backends` (name → port)."""
    binary = require_haproxy()
    servers = "\n".join(f"    server {name} 127.0.0.1:{p} check inter 1s fall 1 rise 1" for name, p in backends.items())
    config = folder / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(port=port, servers=servers))
    checked = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with open(folder / "haproxy.log", "ab") as log:
        process = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield process
    finally:
        stop_group(process, grace_s=5)


@contextlib.contextmanager
def replica_set(postgres: PostgresServer, folder: Path, names: tuple[str, ...] = ("a", "b"),
                extra_env: dict[str, str] | None = None) -> Iterator[ReplicaSet]:
    """Start a fresh database, the replicas (side by side) and haproxy in front; stop them all (by PID) at the end."""
    require_haproxy()
    database_url = postgres.new_database()
    shared_dir = folder / "shared-volume"
    shared_dir.mkdir()
    pacs_port = free_port()
    pacs = service_config(folder / "pacs.yaml", f"http://127.0.0.1:{pacs_port}/dicom-web", models=PACS_MODELS,
                          poll_seconds=1.0)
    replicas = []
    for name in names:
        home = folder / name / "bentoml-home"
        shutil.copytree(ROOT / ".bentoml-test", home, symlinks=True,
                        ignore=shutil.ignore_patterns("prometheus_multiproc_dir", "tmp", "task_result.db*"))
        env = {**replica_env(name, home, folder / name / "data", database_url, shared_dir),
               "NEURONOVA_PACS__CONFIG": str(pacs), **(extra_env or {})}
        replicas.append(Replica(name, free_port(), home, folder / name / "data", folder / name / "server.log", env))
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready()
        port = free_port()
        with haproxy(port, {r.name: r.port for r in replicas}, folder):
            url = f"http://127.0.0.1:{port}"
            wait_balanced(url, set(names))
            yield ReplicaSet(url, replicas, database_url, shared_dir, pacs_port)
    finally:
        for replica in replicas:
            if replica.process is not None and replica.process.poll() is None:
                replica.resume()
                replica.stop()


@pytest.fixture(scope="session")
def replicas(demo_models: dict[str, str], postgres_server: PostgresServer,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicaSet]:
    """Two replicas behind haproxy for the session (started once: about a minute or two)."""
    require_haproxy()
    with replica_set(postgres_server, tmp_path_factory.mktemp("replicas")) as started:
        yield started


@pytest.fixture
def both_serving(replicas: ReplicaSet) -> Iterator[ReplicaSet]:
    """The session's replicas, brought back to serving after the test (for tests that kill, pause or stop one)."""
    yield replicas
    replicas.ensure_serving()
