"""The PACS flow's queue handling in-process, with a scripted stand-in for the DICOMweb PACS (the real round trip
against Orthanc is tests/pacs/): notifications resolved into jobs or a skipped record, retried while the PACS is
unreachable; exports retried with backoff, refused exports failed; runner overload retried; `/changes` followed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
import yaml
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from core.errors import InvalidImageFormat, ModelInferenceError
from state.tasks import PACS_RUN_PREFIX, TaskStore
from pacs.config import PacsConfig
from pacs.dicomweb import PacsRefused, PacsUnavailable, StudySeries
from pacs.flow import PacsFlow, read_results, remove_results, write_results
from state.pacs_jobs import Job, JobStore, Lease, hold_lock

ROOT = Path(__file__).resolve().parents[3]
STUDY = "1.2.3.4"


class ScriptedPacs:
    """Answers from lists: each call takes the next item; an exception item is raised."""

    def __init__(self, series: list | None = None, stores: list | None = None, retrieves: list | None = None) -> None:
        self.series, self.stores, self.retrieves = series or [], stores or [], retrieves or []
        self.stored: list[list[Dataset]] = []

    @staticmethod
    def _next(items: list):
        item = items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def study_series(self, study_uid: str) -> list[StudySeries]:
        return self._next(self.series)

    def retrieve(self, study_uid: str, series_uid: str) -> list[Dataset]:
        return self._next(self.retrieves)

    def store(self, study_uid: str, datasets: list[Dataset]) -> None:
        self._next(self.stores)
        self.stored.append(datasets)


class FailingSlot:
    """A model slot whose runner fails with `error` (the flow must never reach a model in these tests otherwise)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def loaded(self):
        raise self.error


def ultrasound() -> StudySeries:
    header = Dataset()
    header.SeriesInstanceUID, header.Modality, header.SeriesDescription = "1.2.3.4.9", "US", "ABDOMEN"
    return StudySeries("1.2.3.4.9", 1, header)


@pytest.fixture
def flow(tmp_path: Path):
    def make(pacs: ScriptedPacs, slots: dict | None = None) -> PacsFlow:
        config = yaml.safe_load((ROOT / "deploy" / "pacs" / "pacs.yaml").read_text())
        config["source"] = {"url": "http://pacs.invalid/dicom-web"}
        config["export_retry"] = {"initial_seconds": 0.01, "max_seconds": 0.02}
        return PacsFlow(PacsConfig.model_validate(config), JobStore(tmp_path / "jobs.sqlite3"), slots or {},
                        TaskStore(tmp_path / "tasks.sqlite3"), None, tmp_path / "results", pacs)  # type: ignore[arg-type]
    return make


def test_a_notification_is_retried_while_the_pacs_is_down_then_recorded(flow) -> None:
    pacs = ScriptedPacs(series=[PacsUnavailable("QIDO-RS series search: ConnectionError"), [ultrasound()]])
    flows = flow(pacs)
    asyncio.run(flows.notify(STUDY))
    notice = flows.jobs.claim_notice()
    asyncio.run(flows.handle_notice(*notice))
    assert flows.jobs.notice_failures(STUDY) == 1 and flows.jobs.list(STUDY) == []
    asyncio.run(asyncio.sleep(0.02))
    asyncio.run(flows.handle_notice(*flows.jobs.claim_notice()))
    (job,) = flows.jobs.list(STUDY)
    assert job.state == "skipped" and job.reason.startswith("no rule matched: mri_segmentation: ")
    assert flows.jobs.claim_notice() is None


def test_a_notification_whose_model_is_not_loaded_is_retried(flow) -> None:
    from core.errors import ModelNotLoaded

    ct = dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    pacs = ScriptedPacs(series=[[StudySeries(str(ct.SeriesInstanceUID), 1, ct)]])
    flows = flow(pacs, {"ct_classification": FailingSlot(ModelNotLoaded("ct_classification model is not loaded"))})
    asyncio.run(flows.notify(STUDY))
    asyncio.run(flows.handle_notice(*flows.jobs.claim_notice()))
    assert flows.jobs.notice_failures(STUDY) == 1 and flows.jobs.list(STUDY) == []


def test_a_broken_notification_is_dropped_without_ending_the_worker(flow) -> None:
    flows = flow(ScriptedPacs(series=[ValueError("malformed QIDO answer")]))
    asyncio.run(flows.notify(STUDY))
    asyncio.run(flows.handle_notice(*flows.jobs.claim_notice()))
    assert flows.jobs.claim_notice() is None and flows.jobs.list(STUDY) == []


def exporting_job(flows: PacsFlow) -> Lease:
    """A CT job whose result files are written, as a run leaves it before STOW-RS: the run's lease, going on."""
    job_id, _ = flows.jobs.add(STUDY, "ct_classification", "c:1", {"slice": "1.2.3.4.1"})
    lease = flows.jobs.claim()
    write_results(flows.work_dir / job_id, [dcmread(get_testdata_file("CT_small.dcm"))])
    assert flows.jobs.ready_to_export(lease, "built 1 result object(s)")
    return Lease(flows.jobs.get(job_id), lease.attempt)


def test_an_export_is_retried_with_backoff_until_the_pacs_takes_it(flow) -> None:
    pacs = ScriptedPacs(stores=[PacsUnavailable("STOW-RS store: ConnectionError"), None])
    flows = flow(pacs)
    lease = exporting_job(flows)
    job_id = lease.job_id
    asyncio.run(flows.run(lease))  # the same run goes on to export
    job = flows.jobs.get(job_id)
    assert job.state == "exporting" and job.export_failures == 1 and pacs.stored == []
    asyncio.run(asyncio.sleep(0.02))
    asyncio.run(flows.run(flows.jobs.claim()))
    job = flows.jobs.get(job_id)
    assert job.state == "done" and job.results[0]["modality"] == "CT" and len(pacs.stored) == 1
    assert not (flows.work_dir / job_id).exists()


def test_an_export_the_pacs_refuses_fails_the_job(flow) -> None:
    flows = flow(ScriptedPacs(stores=[PacsRefused("STOW-RS: 1 instance(s) refused")]))
    lease = exporting_job(flows)
    asyncio.run(flows.run(lease))
    job = flows.jobs.get(lease.job_id)
    assert job.state == "failed" and "refused" in job.reason


def test_a_run_that_lost_its_job_sends_nothing_and_writes_nothing(flow) -> None:
    """A superseded run (its job claimed again meanwhile: here a restart's recovery and a new claim) stops before
    STOW-RS and its writes change nothing; the run holding the job exports once."""
    pacs = ScriptedPacs(stores=[None])
    flows = flow(pacs)
    stale = exporting_job(flows)
    flows.jobs.recover()
    current = flows.jobs.claim()
    assert current is not None and current.attempt == stale.attempt + 1
    asyncio.run(flows.run(stale))
    assert pacs.stored == [] and flows.jobs.get(stale.job_id).state == "exporting"
    assert not flows.jobs.log(stale, "late") and not flows.jobs.fail(stale, "late")
    asyncio.run(flows.run(current))
    job = flows.jobs.get(stale.job_id)
    assert job.state == "done" and len(pacs.stored) == 1 and "late" not in str(job.log)


@pytest.mark.parametrize("error, state", [
    (PacsUnavailable("WADO-RS series retrieve: ConnectionError"), "queued"),
    (ModelInferenceError("ct_classification runner failed", {"reason": "ServiceUnavailable"}), "queued"),
    (ModelInferenceError("the mri_segmentation model was switched repeatedly during the request; retry it",
                        {"reason": "model_switched"}), "queued"),
    (ModelInferenceError("ct_classification runner failed", {"reason": "ValueError"}), "failed"),
    (InvalidImageFormat("not an image"), "failed"),
])
def test_a_run_that_cannot_proceed_now_is_queued_again_and_one_that_cannot_work_fails(flow, error, state) -> None:
    flows = flow(ScriptedPacs(retrieves=[error]))
    job_id, _ = flows.jobs.add(STUDY, "ct_classification", "c:1", {"slice": "1.2.3.4.1"})
    asyncio.run(flows.run(flows.jobs.claim()))
    job = flows.jobs.get(job_id)
    assert job.state == state and job.runs == (0 if state == "queued" else 1)


def test_the_changes_poller_starts_at_the_newest_change_and_notifies_stable_studies(flow) -> None:
    changes = {None: {"Last": 7}, 7: {"Changes": [{"Seq": 8, "ChangeType": "NewInstance", "ID": "i"},
                                                   {"Seq": 9, "ChangeType": "StableStudy", "ID": "s"}],
                                      "Done": False, "Last": 9},
               9: {"Changes": [], "Done": True, "Last": 9}}

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/studies/s":
            return httpx.Response(200, json={"MainDicomTags": {"StudyInstanceUID": STUDY}})
        since = request.url.params.get("since")
        return httpx.Response(200, json=changes[int(since) if since else None])

    flows = flow(ScriptedPacs())

    async def follow_twice() -> None:
        async with httpx.AsyncClient(base_url="http://orthanc", transport=httpx.MockTransport(answer)) as client:
            await flows._follow_changes(client)
            assert flows.jobs.claim_notice() is None  # history before the first poll is not replayed
            await flows._follow_changes(client)

    asyncio.run(follow_twice())
    assert flows.jobs.cursor("orthanc_changes") == 9
    assert flows.jobs.claim_notice()[0] == STUDY


def test_results_are_written_whole_and_once_and_one_lock_holder_at_a_time(tmp_path: Path) -> None:
    dataset = dcmread(get_testdata_file("CT_small.dcm"))
    write_results(tmp_path / "job", [dataset, dataset])
    assert [str(ds.SOPInstanceUID) for ds in read_results(tmp_path / "job")] == [str(dataset.SOPInstanceUID)] * 2
    write_results(tmp_path / "job", [dataset])  # another run of the job: the folder written first stands
    assert len(read_results(tmp_path / "job")) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["job"]  # no partial folder left
    (tmp_path / "job.partial-0123456789ab").mkdir()  # what a run killed mid-write leaves
    remove_results(tmp_path / "job")
    assert list(tmp_path.iterdir()) == []
    first = hold_lock(tmp_path / "poller.lock")
    assert first is not None
    assert hold_lock(tmp_path / "poller.lock") is None
    first.close()
    assert hold_lock(tmp_path / "poller.lock") is not None


def claim_when_due(jobs: JobStore, timeout_s: float = 30.0) -> Lease:
    """The next job once its backoff has passed."""
    deadline = time.monotonic() + timeout_s
    while (job := jobs.claim()) is None:
        assert time.monotonic() < deadline, "no job became due"
        time.sleep(0.01)
    return job


def test_an_mri_run_the_runner_shed_runs_again_from_its_first_step(flow, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cause of the crash-and-restart test's timeout (issue #28): a fresh server's MRI runner sheds or is not up
    yet, the attempt is queued again, and the next attempt found the first attempt's task record, cancelled when it
    failed, and stopped at its first step: the job failed and the study never got its results."""
    import pipelines.mri

    attempts: list[str] = []

    async def segment_series(slot, tasks, request, series, limits):
        tasks.report(request.task_id, "decoding")  # the pipeline's first step (raises once the task is cancelled)
        attempts.append(request.task_id)
        if len(attempts) == 1:
            raise ModelInferenceError("mri_segmentation runner failed", {"reason": "ServiceUnavailable"})
        raise ModelInferenceError("mri_segmentation runner failed", {"reason": "ValueError"})

    monkeypatch.setattr(pipelines.mri, "segment_series", segment_series)
    slot = type("Slot", (), {"model_id": "mri_segmentation"})()
    flows = flow(ScriptedPacs(retrieves=[[Dataset()], [Dataset()]]), {"mri_segmentation": slot})
    job_id, _ = flows.jobs.add(STUDY, "mri_segmentation", "m:1", {"T1": "1.2.3.4.1"})
    asyncio.run(flows.run(flows.jobs.claim()))
    assert flows.jobs.get(job_id).state == "queued"
    asyncio.run(flows.run(claim_when_due(flows.jobs)))
    assert len(attempts) == 2 and attempts[0] != attempts[1]  # the second attempt reached the runner again
    job = flows.jobs.get(job_id)
    assert job.state == "failed" and job.reason == "mri_segmentation runner failed"


def test_a_later_run_of_a_job_closes_the_task_record_an_earlier_run_left_active(flow, monkeypatch) -> None:
    """A run whose replica was killed leaves its MRI task record `processing`; the run that takes the job over fails
    it (superseded), so no record stays active for ever, and its own record completes."""
    import pipelines.mri

    async def segment_series(slot, tasks, request, series, limits):
        tasks.report(request.task_id, "decoding")
        raise ModelInferenceError("mri_segmentation runner failed", {"reason": "ValueError"})

    monkeypatch.setattr(pipelines.mri, "segment_series", segment_series)
    slot = type("Slot", (), {"model_id": "mri_segmentation"})()
    flows = flow(ScriptedPacs(retrieves=[[Dataset()]]), {"mri_segmentation": slot})
    job_id, _ = flows.jobs.add(STUDY, "mri_segmentation", "m:1", {"T1": "1.2.3.4.1"})
    killed_run = f"{PACS_RUN_PREFIX}{job_id}-killed"
    flows.tasks.create(killed_run, job_id, "mri_segmentation")
    flows.tasks.report(killed_run, "inference")
    asyncio.run(flows.run(flows.jobs.claim()))
    record = flows.tasks.get(killed_run)
    assert record.status == "failed" and record.error["details"]["reason"] == "superseded"
    assert flows.tasks.active_of_request(job_id) == []  # the new run's own record ended with its run
