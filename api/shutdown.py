"""Every process of the server ends within a bound after SIGTERM, and none outlives the `bentoml serve` arbiter.

BentoML runs each worker (API and runners) under uvicorn. After SIGTERM uvicorn waits, without a limit, for the
background jobs of its responses (a BentoML task runs as one) and then joins the threads of the default executor,
so a worker busy in a long step never exits: the arbiter waits for it, and a worker whose arbiter is gone runs on
as an orphan, holding BentoML's task database (a new server in the same directory then fails at start).

`guard_worker_process` (called in every BentoML worker process) therefore:
- starts a deadline at the first SIGTERM/SIGINT: in-flight work has `grace_s` to finish, then the registered
  callbacks run (the API marks its unfinished MRI tasks failed) and the process exits with `os._exit`;
- watches its parent: once the arbiter is gone (killed with SIGKILL) the worker sends itself SIGTERM. The arbiter
  is known by the pid it wrote into the workers' environment (`mark_arbiter`), not by the worker's parent when the
  guard starts: a worker still importing when the arbiter was killed is already an orphan by then (its parent is 1),
  and would otherwise watch init for ever.

uvicorn installs its own signal handlers when it starts serving (after this module is imported), so the deadline
hooks `uvicorn.Server.handle_exit`, the method uvicorn installs, rather than a signal handler of its own.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn

from core.errors import error_body
from state.tasks import TaskStore

log = logging.getLogger("neuronova.shutdown")
PARENT_POLL_S = 1.0
ARBITER_PID = "NEURONOVA_ARBITER_PID"
"""Set by the arbiter in its environment before it starts its workers (circus copies it into theirs)."""
_deadline_callbacks: list[Callable[[], None]] = []
_signal_callbacks: list[Callable[[], None]] = []
_deadline_started = threading.Event()


def is_bentoml_worker() -> bool:
    """Whether this process is a BentoML worker (API or runner), not the arbiter, a test or a script."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", "") == "_bentoml_impl.worker.service"


def at_signal(callback: Callable[[], None]) -> None:
    """Run `callback` at the first SIGTERM/SIGINT (in the signal handler: it must only schedule work)."""
    _signal_callbacks.append(callback)


def at_deadline(callback: Callable[[], None]) -> None:
    """Run `callback` when the shutdown grace has passed, just before the process exits."""
    _deadline_callbacks.append(callback)


def mark_arbiter() -> None:
    """Name this process as the arbiter in the environment the workers it starts inherit (call it in the arbiter,
    which imports the service before it starts its workers)."""
    os.environ[ARBITER_PID] = str(os.getpid())


def guard_worker_process(grace_s: float) -> None:
    """Bound this worker's shutdown to `grace_s` after SIGTERM and end it when its arbiter dies (see module doc)."""
    original = uvicorn.Server.handle_exit

    def handle_exit(server: uvicorn.Server, sig: int, frame: FrameType | None) -> None:
        start_deadline(grace_s)
        original(server, sig, frame)

    uvicorn.Server.handle_exit = handle_exit  # type: ignore[method-assign]
    threading.Thread(target=_watch_parent, args=(arbiter_pid(),), name="neuronova-parent-watch", daemon=True).start()


def arbiter_pid() -> int:
    """The pid of the arbiter that started this worker (its parent when the arbiter named none)."""
    named = os.environ.get(ARBITER_PID, "")
    return int(named) if named.isdigit() else os.getppid()


def start_deadline(grace_s: float) -> None:
    """Start the exit deadline once (later signals do not move it)."""
    if _deadline_started.is_set():
        return
    _deadline_started.set()
    for callback in _signal_callbacks:
        try:
            callback()
        except Exception:  # noqa: BLE001 - the deadline must start whatever a callback does
            log.exception("signal callback failed")
    threading.Thread(target=_exit_after, args=(grace_s,), name="neuronova-shutdown-deadline", daemon=True).start()


def _exit_after(grace_s: float) -> None:
    time.sleep(grace_s)
    for callback in _deadline_callbacks:
        try:
            callback()
        except Exception:  # noqa: BLE001 - exiting matters more than one callback
            log.exception("shutdown callback failed")
    log.warning("worker %d still busy %.0f s after SIGTERM: exiting now", os.getpid(), grace_s)
    logging.shutdown()
    os._exit(0)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    log.warning("worker %d lost its arbiter (pid %d): shutting down", os.getpid(), parent)
    os.kill(os.getpid(), signal.SIGTERM)


def remove_stale_sqlite_sidecars(database: Path) -> list[Path]:
    """Delete the `-wal` and `-shm` files of a SQLite database that is about to be deleted and created afresh.

    BentoML deletes its task database at every start but not these; left by a killed server (or still held by one
    of its orphans) they belong to the old file, and SQLite then fails the new one with "disk I/O error".
    """
    removed = []
    for suffix in ("-wal", "-shm"):
        sidecar = database.with_name(database.name + suffix)
        if sidecar.exists():
            sidecar.unlink()
            removed.append(sidecar)
    return removed


def fail_own_tasks(tasks: TaskStore) -> None:
    """Mark the MRI tasks this worker still runs failed (called at the shutdown deadline): not lost silently."""
    tasks.fail_unfinished(error_body("INTERNAL_SERVER_ERROR", "the server shut down while this task ran; submit it "
                                     "again", {"reason": "server_shutdown"}), owner_pid=os.getpid())


def recover_after_crash(tasks: TaskStore | None, result_store: Path) -> None:
    """At server start, before any worker: fail the tasks a killed server left active in the embedded store `tasks`
    (BentoML's own task store, which queued them, is wiped at every start) and clear that store's stale SQLite files.
    Distributed mode passes no store: the shared queue hands such tasks to another run instead."""
    if tasks is not None:
        tasks.fail_unfinished(error_body("INTERNAL_SERVER_ERROR", "the server stopped while this task ran; submit "
                                         "it again", {"reason": "server_restarted"}))
    for sidecar in remove_stale_sqlite_sidecars(result_store):
        log.warning("removed %s left by a server that did not stop cleanly", sidecar.name)
