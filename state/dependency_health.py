"""Per-process circuit breakers for the replicas' dependencies (the shared PostgreSQL, the shared volume).

A call that finds a dependency unreachable trips its breaker; from then on every caller in the process is refused at
once with `DependencyUnavailable` (503 with `Retry-After` and `details.reason`) instead of each waiting out a connect
timeout, while one background thread probes the dependency every `PROBE_EVERY_S` and closes the breaker at the first
success. So an outage costs the first caller one failed connection (refused at once, or `PG_CONNECT_TIMEOUT_S` for a
host that does not answer) and everyone after it nothing; a recovery is seen within `PROBE_EVERY_S`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import sqlalchemy.exc

from core.errors import DependencyUnavailable

log = logging.getLogger("neuronova.dependencies")

PROBE_EVERY_S = 1.0
"""How often an open breaker's background thread tries the dependency again."""
READY_PROBE_MAX_AGE_S = 2.0
"""A readiness check (`/readyz`) probes a closed breaker's dependency itself when nothing has for this long."""
DATABASE_UNREACHABLE = "database_unreachable"
SHARED_VOLUME_UNAVAILABLE = "shared_volume_unavailable"

Probe = Callable[[], None]
"""Raises when the dependency cannot be used now; returns when it can."""


class Breaker:
    """The health of one dependency as this process sees it: closed (usable) or open (refuse at once, probe)."""

    def __init__(self, name: str, reason: str, probe: Probe, probe_every_s: float = PROBE_EVERY_S,
                 ready_probe: Probe | None = None) -> None:
        self.name, self.reason, self.probe, self.probe_every_s = name, reason, probe, probe_every_s
        self.ready_probe = ready_probe or probe
        """How a readiness check probes while the breaker is closed (the database: a pooled connection, within the
        process's connection budget; `probe`, used while open, connects anew)."""
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._last_probe = 0.0
        self._prober_pid: int | None = None
        """The process whose probing thread runs (a forked child has none, though it inherits this object)."""

    @property
    def available(self) -> bool:
        return self._down_since is None

    def unavailable(self) -> DependencyUnavailable:
        """The error every caller gets while the breaker is open."""
        down_for = 0.0 if self._down_since is None else time.monotonic() - self._down_since
        return DependencyUnavailable(f"{self.name} is unreachable; try again shortly",
                                     {"reason": self.reason, "down_for_seconds": round(down_for, 1)})

    def check(self) -> None:
        """Raise `DependencyUnavailable` at once while the breaker is open."""
        if self._down_since is not None:
            self._ensure_prober()
            raise self.unavailable()

    def tripped(self, cause: BaseException) -> DependencyUnavailable:
        """Open the breaker for `cause` (a failed connection, a failed file write); the error to raise."""
        with self._lock:
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("%s unreachable (%s): refusing the calls that need it until a probe succeeds",
                            self.name, type(cause).__name__)
        self._ensure_prober()
        return self.unavailable()

    def ready(self) -> bool:
        """For a readiness check: False while open; when closed, the dependency is probed (at most once per
        `READY_PROBE_MAX_AGE_S`), so an outage no caller has met yet still makes the process unready."""
        if self._down_since is not None:
            self._ensure_prober()
            return False
        if time.monotonic() - self._last_probe >= READY_PROBE_MAX_AGE_S:
            self._last_probe = time.monotonic()
            try:
                self.ready_probe()
            except Exception as exc:  # noqa: BLE001 - any failure of the probe means unusable
                self.tripped(exc)
                return False
        return True

    def _ensure_prober(self) -> None:
        with self._lock:
            if self._down_since is None or self._prober_pid == os.getpid():
                return
            self._prober_pid = os.getpid()
        threading.Thread(target=self._probe_until_up, name=f"probe-{self.name}", daemon=True).start()

    def _probe_until_up(self) -> None:
        while True:
            time.sleep(self.probe_every_s)
            try:
                self.probe()
            except Exception:  # noqa: BLE001 - still down: try again
                continue
            with self._lock:
                down_for = time.monotonic() - (self._down_since or time.monotonic())
                self._down_since, self._prober_pid, self._last_probe = None, None, time.monotonic()
            log.warning("%s reachable again after %.1f s", self.name, down_for)
            return


_BREAKERS: dict[tuple[str, str], Breaker] = {}
_REGISTRY_LOCK = threading.Lock()


def breaker(kind: str, key: str, make: Callable[[], Breaker]) -> Breaker:
    """This process's one breaker of dependency `kind` at `key` (a database URL, a directory)."""
    with _REGISTRY_LOCK:
        if (kind, key) not in _BREAKERS:
            _BREAKERS[(kind, key)] = make()
        return _BREAKERS[(kind, key)]


def shared_volume(directory: str | Path) -> Breaker:
    """The breaker of the shared volume at `directory`: usable when a small file can be written, synced and removed."""
    folder = Path(directory)

    def probe() -> None:
        path = folder / f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(path, "wb") as handle:
            handle.write(b"probe")
            handle.flush()
            os.fsync(handle.fileno())
        path.unlink()

    return breaker("shared_volume", str(folder), lambda: Breaker("the shared volume", SHARED_VOLUME_UNAVAILABLE, probe))


@contextmanager
def file_io_on(volume: Breaker | None) -> Iterator[None]:
    """File I/O on the shared volume `volume` (None: a local disk, nothing guarded): refused at once while its breaker
    is open; an I/O error trips it (a file that is missing or already there is an answer, not an outage)."""
    if volume is None:
        yield
        return
    volume.check()
    try:
        yield
    except (FileNotFoundError, FileExistsError):
        raise
    except OSError as exc:
        raise volume.tripped(exc) from exc


def unreachable_dependency(exc: BaseException) -> bool:
    """Whether `exc`, or an error it was raised from (a job queue's wrapper), says a dependency cannot be reached now:
    the database refused, timed out, dropped or had no pooled connection, or a breaker is open
    (`state.dependency_health`)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (DependencyUnavailable, sqlalchemy.exc.TimeoutError, psycopg.OperationalError)):
            return True
        if isinstance(seen, sqlalchemy.exc.DBAPIError) and (
                seen.connection_invalidated or isinstance(seen.orig, psycopg.OperationalError)):
            return True
        seen = seen.__cause__
    return False
