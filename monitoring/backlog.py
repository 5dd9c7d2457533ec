"""The MRI task backlog as gauges: how many tasks wait or run, and how long the oldest has been unfinished.

A scrape cannot ask the task store (BentoML serves `/metrics` from the metrics files alone), so each API worker
reads the store every `REFRESH_SECONDS` in a thread and sets the gauges; the store is shared by the workers (and,
distributed, by the replicas), so they all set the same values and the scrape shows the freshest worker's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

from bentoml._internal.configuration.containers import BentoMLContainer

from state.tasks import TaskStates
from monitoring.metrics import NAMESPACE

REFRESH_SECONDS = 15.0
log = logging.getLogger("neuronova.monitoring")


@functools.cache
def _gauges() -> tuple[Any, Any]:
    client = BentoMLContainer.metrics_client.get()
    tasks = client.Gauge(namespace=NAMESPACE, name="tasks", documentation="Unfinished MRI tasks by status",
                         labelnames=["status"], multiprocess_mode="livemostrecent")
    oldest = client.Gauge(namespace=NAMESPACE, name="task_oldest_unfinished_age_seconds",
                          documentation="Age of the oldest pending or processing MRI task (0: none)",
                          multiprocess_mode="livemostrecent")
    return tasks, oldest


def publish_backlog(store: TaskStates, now: float | None = None) -> None:
    """Read the store's backlog and set the gauges."""
    backlog = store.backlog()
    tasks, oldest = _gauges()
    for status, count in backlog.counts.items():
        tasks.labels(status).set(count)
    age = 0.0 if backlog.oldest_created_at is None else (now or time.time()) - backlog.oldest_created_at
    oldest.set(max(0.0, age))


async def watch_backlog(store: TaskStates, interval: float = REFRESH_SECONDS) -> None:
    """Publish the backlog every `interval` seconds until cancelled; a store that cannot be read (a database outage)
    leaves the gauges as they were and is logged once until it can be read again."""
    failing = False
    while True:
        try:
            await asyncio.to_thread(publish_backlog, store)
            if failing:
                log.info("task backlog readable again")
            failing = False
        except Exception as exc:  # noqa: BLE001 - any store error: keep watching
            if not failing:
                log.warning("task backlog unreadable: %s", type(exc).__name__)
            failing = True
        await asyncio.sleep(interval)
