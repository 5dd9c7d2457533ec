"""How the PACS connection lives in the service: built per API worker from the settings, its job loop (and, in one
worker of all, the `/changes` poller) started as background tasks on the worker's event loop, stopped with it.
`state.stores.open_job_store` is the one place that picks the job store: embedded (SQLite under the data directory) or, with
`distributed.database_url` set, PostgreSQL shared by every replica, so PACS runs on every replica.

Imported by the service only when `NEURONOVA_PACS__CONFIG` is set.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from pathlib import Path

import numpy as np

from pipelines.runner_slots import ModelSlot
from core.errors import ModelNotLoaded, NotFound
from core.settings import Settings
from state.tasks import TaskStates
from pacs.config import load_config
from pacs.flow import PacsFlow
from state.pacs_jobs import HeldLock, Job, Notice, Notified, PacsJobs, hold_lock
from state.stores import open_job_store
from preprocessing.transforms import to_layout

log = logging.getLogger("neuronova.pacs")
LEADER_RETRY_S = 10.0
"""How often a worker without the `/changes` poller's lock tries to take it (its holder may have died), and how often
the holder checks it still holds it."""


def notify_tokens(settings: Settings) -> dict[str, str]:
    """The static token `/pacs/notify` accepts besides an admin JWT (none when the config names none)."""
    token = load_config(settings.pacs.config).notify_token()  # type: ignore[arg-type]
    return {"/pacs/notify": token} if token else {}


def build_flow(settings: Settings, slots: dict[str, ModelSlot], tasks: TaskStates) -> PacsFlow:
    # The jobs' lines (study queued, known already or left alone, results stored) are what an operator follows in the
    # server log; they carry UIDs, model versions and counts, never patient data.
    log.setLevel(logging.INFO)
    config = load_config(settings.pacs.config)  # type: ignore[arg-type]
    jobs = open_job_store(settings)
    return PacsFlow(config, jobs, slots, tasks, settings.limits, jobs.results_dir)


def recover(settings: Settings) -> None:
    """Once per server start, before the workers: jobs a killed server (or this replica's previous run) left running
    are queued again (once)."""
    requeued = open_job_store(settings).recover()
    if requeued:
        log.warning("pacs: %d job(s) interrupted by the last shutdown queued to run again: %s", len(requeued),
                    ", ".join(requeued))


async def warm_up_pipeline(flow: PacsFlow) -> None:
    """Import the MRI pipeline in this worker now (tens of seconds on a busy 2-core machine) rather than with the
    first MRI job: a PACS-connected server segments every brain-MR study, so its first is served at full speed."""
    if any(rules.model_id == "mri_segmentation" for rules in flow.config.models):
        await asyncio.to_thread(importlib.import_module, "pipelines.mri")


async def warm_up_gradcam(flow: PacsFlow, lock_path: Path, runner_wait_s: float = 300.0) -> None:
    """Have the CT runner load Grad-CAM (torch) by one blank explanation, once it answers (after start-up: the
    runners are reachable only once the workers serve); every CT job of the PACS explains. One worker does it (the
    one holding `lock_path`): a second explanation queued behind the loading one would be shed by adaptive batching
    (pitfall G13)."""
    if not any(rules.model_id == "ct_classification" for rules in flow.config.models):
        return
    lock = hold_lock(lock_path)
    if lock is None:
        return
    try:
        await _explain_blank(flow.slots["ct_classification"], runner_wait_s)
    finally:
        lock.close()


async def _explain_blank(slot: ModelSlot, runner_wait_s: float) -> None:
    deadline = time.monotonic() + runner_wait_s
    while True:
        try:
            spec = (await slot.loaded()).card.input
            blank = np.zeros((spec.channels, spec.height, spec.width), dtype=np.float32)
            await slot.call("explain", to_layout(blank, spec)[None])
            return
        except ModelNotLoaded:
            if time.monotonic() > deadline:
                log.warning("pacs: the CT runner did not answer for the warm-up: the first CT job loads Grad-CAM")
                return
            await asyncio.sleep(1.0)
        except Exception as exc:  # noqa: BLE001 - a failed warm-up only makes the first CT job slower
            log.warning("pacs: CT warm-up failed (%s): the first CT job loads Grad-CAM", type(exc).__name__)
            return


class Background:
    """The worker's PACS tasks: the job loop always, the `/changes` poller where configured and while this worker
    holds the poller lock (a file lock on one machine, an advisory lock in PostgreSQL across replicas)."""

    def __init__(self, flow: PacsFlow, data_dir: str) -> None:
        self.flow = flow
        self.data_dir = Path(data_dir)
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Import the MRI pipeline (the worker is ready after it), then work the queue in the background."""
        await warm_up_pipeline(self.flow)
        self.tasks.append(asyncio.create_task(warm_up_gradcam(self.flow, self.data_dir / "pacs" / "warm-up.lock"),
                                              name="pacs-warm-up"))
        self.tasks.append(asyncio.create_task(self.flow.run_forever(), name="pacs-jobs"))
        if self.flow.config.changes is not None:
            self.tasks.append(asyncio.create_task(self.poll_while_leader(), name="pacs-changes"))

    async def poll_while_leader(self) -> None:
        """Poll `/changes` while this worker holds the poller lock; without it, try to take it every
        `LEADER_RETRY_S` (the holder may have stopped)."""
        while True:
            try:
                lock = await asyncio.to_thread(self.flow.jobs.poller_lock)
            except Exception as exc:  # noqa: BLE001 - the database unreachable: try again later
                log.warning("pacs: the /changes poller lock could not be asked for (%s)", type(exc).__name__)
                lock = None
            if lock is not None:
                await self._poll_holding(lock)
            await asyncio.sleep(LEADER_RETRY_S)

    async def _poll_holding(self, lock: HeldLock) -> None:
        changes = self.flow.config.changes
        assert changes is not None
        log.info("pacs: polling %s/changes every %.1f s", changes.url, changes.interval_seconds)
        poller = asyncio.create_task(self.flow.poll_changes(), name="pacs-changes-poll")
        try:
            while await asyncio.to_thread(lock.held):
                await asyncio.sleep(LEADER_RETRY_S)
            log.warning("pacs: the /changes poller lock was lost: polling stops here")
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
            await asyncio.to_thread(lock.close)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def notified(flow: PacsFlow, notice: Notice) -> Notified:
    await flow.notify(notice.study_instance_uid)
    return Notified(study_instance_uid=notice.study_instance_uid)


async def job_of(flow: PacsFlow, job_id: str) -> Job:
    job = await asyncio.to_thread(flow.jobs.get, job_id)
    if job is None:
        raise NotFound("unknown PACS job id")  # the id is not echoed: it came from the caller
    return job
