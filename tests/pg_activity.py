"""Who holds connections to a PostgreSQL database, as `pg_stat_activity` shows it: sampled from a connection of the
test's own (left out of the counts) until stopped, for the connection-budget tests."""

from __future__ import annotations

import threading
from collections import Counter

import psycopg

MONITOR_NAME = "neuronova-test-monitor"
ACTIVITY_SQL = ("SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND pid <> pg_backend_pid() GROUP BY application_name")


def connections(database_url: str) -> Counter[str]:
    """Client connections to the database now, by `application_name` (this query's own left out)."""
    with psycopg.connect(database_url, autocommit=True, application_name=MONITOR_NAME) as monitor:
        return Counter(dict(monitor.execute(ACTIVITY_SQL).fetchall()))


class ConnectionSamples:
    """Counts by `application_name`, sampled back to back while the `with` block runs."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.samples: list[Counter[str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="pg-activity", daemon=True)

    def _sample(self) -> None:
        with psycopg.connect(self.database_url, autocommit=True, application_name=MONITOR_NAME) as monitor:
            while not self._stop.is_set():
                self.samples.append(Counter(dict(monitor.execute(ACTIVITY_SQL).fetchall())))

    def peak(self, prefix: str) -> int:
        """The most connections whose name starts with `prefix` seen at once."""
        return max((sum(n for name, n in sample.items() if name.startswith(prefix)) for sample in self.samples),
                   default=0)

    def names(self) -> set[str]:
        """Every `application_name` seen."""
        return {name for sample in self.samples for name in sample}

    def __enter__(self) -> ConnectionSamples:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
