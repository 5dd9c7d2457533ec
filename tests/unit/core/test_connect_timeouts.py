"""An unresponsive PostgreSQL (it accepts the TCP connection and never answers) is answered, not suffered: every way
the service connects gives up with an error after `PG_CONNECT_TIMEOUT_S` instead of waiting for ever."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from state.job_queue import prepare_database
from state import shared_db
from state.feedback_db import open_engine
from state.pg_tasks import PostgresTaskStore

ENDED_WITHIN_S = 60.0
"""A bound far above the connect timeout: reaching it means the attempt hung."""


@pytest.fixture
def silent_postgres() -> Iterator[str]:
    """A URL whose server accepts connections and never says a word."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"postgresql://nobody:secret@127.0.0.1:{listener.getsockname()[1]}/neuronova"
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    listener.close()


def outcome_of(attempt: Callable[[], object]) -> BaseException | None:
    """The error `attempt` ended with (None: it returned), failing the test if it did not end in time."""
    ended: list[BaseException | None] = []

    def run() -> None:
        try:
            attempt()
        except BaseException as exc:  # noqa: BLE001 - the error is the outcome under test
            ended.append(exc)
        else:
            ended.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(ENDED_WITHIN_S)
    assert ended, f"the connection attempt still hangs after {ENDED_WITHIN_S:.0f} s"
    return ended[0]


@pytest.mark.parametrize("connect", [
    lambda url, tmp: shared_db.engine(url),
    lambda url, tmp: open_engine(url),
    lambda url, tmp: PostgresTaskStore(url, tmp),
    lambda url, tmp: prepare_database(url),
], ids=["replicas' shared state", "feedback database", "task store", "job queue schema"])
def test_every_connection_to_an_unresponsive_database_gives_up(silent_postgres: str, tmp_path: Path,
                                                               connect) -> None:
    error = outcome_of(lambda: connect(silent_postgres, tmp_path))
    assert error is not None and "timeout" in f"{error} {error.__cause__}".lower()  # a breaker's 503 keeps its cause
