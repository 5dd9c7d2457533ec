"""The PACS round trip, run by the API workers: a stable study is notified (Lua `OnStableStudy`, or the `/changes`
poller), its series are read by QIDO-RS and selected by each model's rules, a job is queued per matching model (once:
`state.pacs_jobs`), and a worker runs it: WADO-RS retrieve, the service's own pipeline (MRI: `pipelines.mri.segment_series`;
CT: `pipelines.classification.classify_slice` with Grad-CAM), the result objects (`postprocessing.dicom_results`; an MR run
that finds no tumour gets a negative report, never nothing) written to the job's folder, then STOW-RS into the same
study, retried with backoff while the PACS is unreachable. The job store (`state.pacs_jobs.PacsJobs`) is one SQLite file on
one machine or PostgreSQL shared by every replica; either way a run holds its job by a lease, every write of the run
is fenced by it, and a run that lost its job stops before it sends anything.

Logs and job state carry UIDs, model versions and counts, never a patient name or id.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset

from pipelines.classification import GRAD_CAM, classify_slice
from pipelines.runner_slots import MODEL_SWITCHED, ModelSlot
from pipelines.shaping import class_probabilities
from core.errors import ModelInferenceError, ModelNotLoaded, NeuroNovaError, error_body
from core.settings import LimitSettings
from state.tasks import PACS_RUN_PREFIX, TaskStates
from pacs.config import PacsConfig
from pacs.dicomweb import DicomWebPacs, PacsRefused, PacsUnavailable, StudySeries
from state.pacs_jobs import NO_RULE, Lease, PacsJobs
from pacs.selection import SeriesFacts, select_series
from postprocessing.dicom_results import dataset_bytes, mr_negative_report, segment_volumes_ml
from postprocessing.parametric_maps import missing_geometry
from postprocessing.result_sets import ct_results, mr_results
from xai.render import to_source_geometry

log = logging.getLogger("neuronova.pacs")
STABLE_STUDY = "StableStudy"
OVERLOADED = "ServiceUnavailable"
"""A runner call shed by adaptive batching (pitfall G13) or a runner restarting: the job is tried again later."""
RETRIED_REASONS = (OVERLOADED, MODEL_SWITCHED)
"""Model failures a PACS job waits out and runs again: a runner shedding load, a model switched during the run."""


class PacsFlow:
    """Notification -> jobs -> results in the PACS, for one configuration and the service's model slots."""

    def __init__(self, config: PacsConfig, jobs: PacsJobs, slots: dict[str, ModelSlot], tasks: TaskStates,
                 limits: LimitSettings, work_dir: Path, pacs: DicomWebPacs | None = None) -> None:
        self.config = config
        self.jobs = jobs
        self.slots = slots
        self.tasks = tasks
        self.limits = limits
        self.work_dir = work_dir
        self.pacs = pacs or DicomWebPacs(config.source, config.store_to, config.retrieval)
        self.wake = asyncio.Event()

    async def notify(self, study_uid: str) -> None:
        """Queue a stable-study notification for the job loop (returns at once: see `Notified`)."""
        await asyncio.to_thread(self.jobs.notice, study_uid)
        self.wake.set()

    async def resolve(self, study_uid: str) -> list[str]:
        """Select series for every configured model and queue a job per match (an existing job is reused); a study
        no model matches is recorded as skipped, with each model's reason. The job ids; PacsUnavailable when the
        study's series cannot be searched now."""
        series: list[StudySeries] = await asyncio.to_thread(self.pacs.study_series, study_uid)
        facts = [SeriesFacts.from_instance(s.header, s.instance_count) for s in series]
        found, reasons = [], []
        for rules in self.config.models:
            selection = select_series(rules, facts)
            if not selection.matched:
                reasons.append(f"{rules.model_id}: {selection.reason}")
                continue
            model = await self.slots[rules.model_id].loaded()
            job_id, new = await asyncio.to_thread(self.jobs.add, study_uid, rules.model_id, model.tag,
                                                  selection.series, priority=rules.priority)
            log.info("pacs: study %s -> %s job %s (%s)", study_uid, rules.model_id, job_id,
                     "queued" if new else "already known")
            found.append(job_id)
        if not found:
            reason = f"{NO_RULE}: " + "; ".join(reasons)
            job_id, _ = await asyncio.to_thread(self.jobs.add, study_uid, None, None, {}, "skipped", reason)
            log.info("pacs: study %s left alone (%s)", study_uid, reason)
            found.append(job_id)
        return found

    async def run_forever(self) -> None:
        """Work the queues: a due notification (resolved into jobs), else a due job; idle, wake on a notification
        or every poll interval. An error of the queue itself (its database busy or unreachable) is logged and the
        loop goes on after a poll interval: it never ends while the worker lives."""
        while True:
            try:
                worked = await self.work_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the loop outlives any one failure
                log.warning("pacs: job queue error (%s: %s), trying again in %.1f s", type(exc).__name__, exc,
                            self.config.poll_seconds)
                worked = False
            if not worked:
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), self.config.poll_seconds)
                except TimeoutError:
                    pass

    async def work_once(self) -> bool:
        """Handle one due notification, else run one due job; whether there was one."""
        notice = await asyncio.to_thread(self.jobs.claim_notice)
        if notice is not None:
            await self.handle_notice(*notice)
            return True
        lease = await asyncio.to_thread(self.jobs.claim)
        if lease is None:
            return False
        with self.jobs.keep_alive(lease):
            await self.run(lease)
        return True

    async def handle_notice(self, study_uid: str, received_at: float) -> None:
        try:
            await self.resolve(study_uid)
        except asyncio.CancelledError:
            raise
        except (PacsUnavailable, ModelNotLoaded) as exc:
            delay = self.config.export_retry.delay(await asyncio.to_thread(self.jobs.notice_failures, study_uid) + 1)
            log.warning("pacs: study %s could not be searched (%s), retrying in %.1f s", study_uid, exc, delay)
            await asyncio.to_thread(self.jobs.notice_failed, study_uid, delay)
            return
        except Exception as exc:  # noqa: BLE001 - a bad study is logged and dropped, never the worker's end
            log.warning("pacs: notification of study %s dropped: %s: %s", study_uid, type(exc).__name__, exc)
        await asyncio.to_thread(self.jobs.notice_handled, study_uid, received_at)

    async def run(self, lease: Lease) -> None:
        """Compute (unless the result files are already written) and export one claimed job; every write of the run
        names its lease, and a run that lost its job (taken over) stops at its next write."""
        job = lease.job
        folder = self.work_dir / job.job_id
        try:
            if job.state == "running":
                datasets = await self.compute(lease)
                await asyncio.to_thread(write_results, folder, datasets)
                if not await asyncio.to_thread(self.jobs.ready_to_export, lease, f"built {len(datasets)} result "
                                               "object(s): " + ", ".join(str(ds.Modality) for ds in datasets)):
                    self._superseded(lease)
                    return
            await self.export(lease, folder)
        except (PacsUnavailable, ModelNotLoaded, ModelInferenceError) as exc:
            if isinstance(exc, ModelInferenceError) and exc.details.get("reason") not in RETRIED_REASONS:
                await self._failed(lease, exc)
                return
            current = await asyncio.to_thread(self.jobs.get, job.job_id)
            delay = self.config.export_retry.delay((current.export_failures if current else 0) + 1)
            if current is not None and current.state == "exporting":
                log.warning("pacs: job %s export failed (%s), retrying in %.1f s", job.job_id, exc, delay)
                await asyncio.to_thread(self.jobs.export_failed, lease, f"export failed: {exc}", delay)
            else:
                log.warning("pacs: job %s could not run now (%s), retrying in %.1f s", job.job_id, exc, delay)
                await asyncio.to_thread(self.jobs.retry_later, lease, f"could not run now: {exc}", delay)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one job's failure is recorded, never the worker's end
            await self._failed(lease, exc)

    async def _failed(self, lease: Lease, exc: Exception) -> None:
        reason = exc.message if isinstance(exc, NeuroNovaError) else f"{type(exc).__name__}: {exc}"
        log.warning("pacs: job %s failed: %s", lease.job_id, reason)
        await asyncio.to_thread(self.jobs.fail, lease, reason[:500])

    @staticmethod
    def _superseded(lease: Lease) -> None:
        log.warning("pacs: job %s was taken over by another worker: attempt %d stops, writing nothing", lease.job_id,
                    lease.attempt)

    async def _log(self, lease: Lease, message: str) -> None:
        await asyncio.to_thread(self.jobs.log, lease, message)

    async def compute(self, lease: Lease) -> list[Dataset]:
        """Retrieve the job's series and run its model; the result objects, in store order."""
        job = lease.job
        series = {role: await asyncio.to_thread(self.pacs.retrieve, job.study_instance_uid, uid)
                  for role, uid in job.series.items()}
        await self._log(lease, f"retrieved {sum(len(d) for d in series.values())} instance(s) of "
                        f"{len(series)} series; running {job.model_id}")
        if job.model_id == "mri_segmentation":
            return await self._segment(lease, series)
        return await self._classify(lease, series)

    def _close_earlier_runs(self, job_id: str, current: str) -> None:
        """Fail the task records earlier runs of this job left active (a run whose replica was killed or frozen, taken
        over): the job's MRI work is this run's now, and a resumed old run stops at its next step."""
        for task_id in self.tasks.active_of_request(job_id):
            if task_id != current:
                self.tasks.fail(task_id, error_body("PACS_JOB_FAILED", "superseded by a later run of the PACS job",
                                                    {"reason": "superseded"}))

    async def _segment(self, lease: Lease, series: dict[str, list[Dataset]]) -> list[Dataset]:
        job = lease.job
        mri = await asyncio.to_thread(importlib.import_module, "pipelines.mri")
        slot = self.slots["mri_segmentation"]
        # A task record of its own for every attempt: a failed attempt's record is cancelled (`TaskStates.fail`), and
        # an attempt queued again after the runner shed it must not find that record (it would stop at its first step).
        task_id = f"{PACS_RUN_PREFIX}{job.job_id}-{uuid.uuid4().hex[:12]}"
        await asyncio.to_thread(self.tasks.create, task_id, job.job_id, slot.model_id)
        await asyncio.to_thread(self._close_earlier_runs, job.job_id, task_id)
        objects = self.config.rules_for(slot.model_id).result_objects
        request = mri.SegmentationRequest(task_id=task_id, request_id=job.job_id, images=(), sequence_type=None,
                                          xai=False, post_processing=mri.PostProcessingOptions(),
                                          uncertainty="uncertainty_map" in objects)
        try:
            segmented = await mri.segment_series(slot, self.tasks, request, series, self.limits)
        except Exception as exc:
            await asyncio.to_thread(self.tasks.fail, task_id, exc if isinstance(exc, NeuroNovaError)
                                    else error_body("PACS_JOB_FAILED", type(exc).__name__))
            raise
        await asyncio.to_thread(self.tasks.complete, task_id, {"pacs_job": job.job_id})
        response, volume = segmented.response, segmented.volume
        card = (await slot.loaded()).card
        result, tag = response.result, response.model_version
        uncertainty = None if result.uncertainty is None else mri.delivered_volume(result.uncertainty.map) / 100.0
        datasets: list[Dataset] = []
        if not result.tumor_detected:
            read = [source for source in volume.sources if source.headers]
            doubts = [warning for warning in response.warnings if warning != mri.NO_SEG_WARNING]  # the report says it
            datasets.append(await asyncio.to_thread(mr_negative_report, read, doubts, card, tag, uid_key=job.job_id))
            await self._log(lease, "no tumour detected: negative report written")
            objects = tuple(kind for kind in objects if kind == "uncertainty_map")  # no segment to store or measure
        if objects:
            built = await asyncio.to_thread(
                lambda: mr_results(mri.delivered_volume(result.mask), volume.source_of(volume.reference_sequence),
                                   segment_volumes_ml(result.label_statistics), card, tag, uncertainty=uncertainty,
                                   objects=objects, uid_key=job.job_id))
            datasets += built.objects
        return datasets

    async def _classify(self, lease: Lease, series: dict[str, list[Dataset]]) -> list[Dataset]:
        job = lease.job
        datasets = next(iter(series.values()))
        source = sorted(datasets, key=lambda ds: int(ds.get("InstanceNumber") or 0))[len(datasets) // 2]
        slot = self.slots["ct_classification"]
        out = await classify_slice(slot, dataset_bytes(source), None, xai_methods=[GRAD_CAM],
                                   max_pixels=self.limits.max_image_pixels)
        card = out.model.card
        result = class_probabilities(out.probabilities, card.contract_labels())
        method, heatmap = next(iter(out.heatmaps.items()))
        display = out.prepared.display
        probabilities = {label: float(p) for label, p in zip(card.contract_labels(), out.probabilities)}
        objects = self.config.rules_for(slot.model_id).result_objects
        missing = missing_geometry(source)
        if "heatmap_map" in objects and missing:
            objects = tuple(kind for kind in objects if kind != "heatmap_map")
            await self._log(lease, f"no heatmap map: the source slice has no {', '.join(missing)}")
        built = await asyncio.to_thread(lambda: ct_results(
            source, display, to_source_geometry(heatmap, display.shape), method, probabilities,
            result.predicted_class, card, out.model.tag, objects=objects, uid_key=job.job_id))
        return list(built.objects)

    async def export(self, lease: Lease, folder: Path) -> None:
        """STOW-RS the job's result files into its study, unless the run lost its job (checked just before: a run
        superseded meanwhile sends the same files, same UIDs, so the PACS still holds one result set); done with what
        was stored."""
        job = lease.job
        if not await asyncio.to_thread(self.jobs.renew, lease):
            self._superseded(lease)
            return
        datasets = await asyncio.to_thread(read_results, folder)
        if datasets:
            try:
                await asyncio.to_thread(self.pacs.store, job.study_instance_uid, datasets)
            except PacsRefused as exc:
                raise RuntimeError(f"the PACS refused the results: {exc}") from None
        stored = [{"modality": str(ds.Modality), "sop_class_uid": str(ds.SOPClassUID),
                   "series_instance_uid": str(ds.SeriesInstanceUID), "sop_instance_uid": str(ds.SOPInstanceUID)}
                  for ds in datasets]
        if not await asyncio.to_thread(self.jobs.done, lease, stored, f"stored {len(stored)} object(s) into the study"):
            self._superseded(lease)
            return
        log.info("pacs: job %s done: %d object(s) stored into study %s", job.job_id, len(stored),
                 job.study_instance_uid)
        await asyncio.to_thread(remove_results, folder)

    async def poll_changes(self) -> None:
        """Follow Orthanc's `/changes` from where the last poll stopped (the first poll starts at the newest change)
        and notify every StableStudy; an unreachable Orthanc is retried at the next interval."""
        polling = self.config.changes
        assert polling is not None
        headers = polling.auth.headers() if polling.auth is not None else {}
        async with httpx.AsyncClient(base_url=polling.url, headers=headers, timeout=30) as client:
            while True:
                try:
                    await self._follow_changes(client)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - Orthanc restarting, a torn answer: the next poll goes on
                    log.warning("pacs: /changes poll failed: %s", type(exc).__name__)
                await asyncio.sleep(polling.interval_seconds)

    async def _follow_changes(self, client: httpx.AsyncClient) -> None:
        since = await asyncio.to_thread(self.jobs.cursor, "orthanc_changes")
        if since is None:
            last = (await client.get("/changes", params={"last": ""})).raise_for_status().json()
            await asyncio.to_thread(self.jobs.set_cursor, "orthanc_changes", int(last["Last"]))
            return
        while True:
            page = (await client.get("/changes", params={"since": since, "limit": 100})).raise_for_status().json()
            for change in page["Changes"]:
                if change["ChangeType"] == STABLE_STUDY:
                    study = await client.get(f"/studies/{change['ID']}")
                    if study.status_code != httpx.codes.NOT_FOUND:  # deleted since: nothing to notify
                        await self.notify(study.raise_for_status().json()["MainDicomTags"]["StudyInstanceUID"])
                since = int(change["Seq"])
                await asyncio.to_thread(self.jobs.set_cursor, "orthanc_changes", since)
            if page["Done"]:
                return
            since = int(page["Last"])


def write_results(folder: Path, datasets: Sequence[Dataset]) -> None:
    """The job's result files, written whole or not at all (a half-written folder is never exported), and once: where
    another run of the job (a crashed server's, a superseded replica's) already wrote the folder, that one stands. It
    holds the same objects under the same UIDs (they derive from the job id), so whichever run exports it, the PACS
    gets one result set."""
    partial = folder.with_name(f"{folder.name}.partial-{uuid.uuid4().hex[:12]}")
    partial.mkdir(parents=True, mode=0o700)
    try:
        for index, dataset in enumerate(datasets):
            (partial / f"{index:02d}.dcm").write_bytes(dataset_bytes(dataset))
        try:
            os.rename(partial, folder)  # atomic; refused where another run's folder is there already
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def remove_results(folder: Path) -> None:
    """The job's result files once exported, with what runs that never finished writing left beside them."""
    for path in [folder, *folder.parent.glob(f"{folder.name}.partial-*")]:
        shutil.rmtree(path, ignore_errors=True)


def read_results(folder: Path) -> list[Dataset]:
    return [dcmread(path) for path in sorted(folder.glob("*.dcm"))]
