"""The durable PACS job queue (state/pacs_jobs.py), its configuration (pacs/config.py) and the DICOMweb error mapping
(pacs/dicomweb.py), in-process: idempotency, leases, restart recovery, backoff, notifications, cursors."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from pydantic import ValidationError
from pydicom import dcmread
from pydicom.data import get_testdata_file

from core.errors import ImageTooLarge
from pacs import dicomweb
from pacs.config import DicomWebEndpoint, EndpointAuth, ExportRetry, PacsConfig, RetrievalLimits, load_config
from pacs.dicomweb import DicomWebPacs, PacsRefused, PacsUnavailable, _calling
from state.pacs_jobs import MAX_RUNS, JobStore, idempotency_key

ROOT = Path(__file__).resolve().parents[3]
STUDY = "1.2.3.4"
SERIES = {"T1": "1.2.3.4.1", "T2": "1.2.3.4.2"}


@pytest.fixture
def jobs(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "pacs" / "jobs.sqlite3")


def dead_pid() -> int:
    """The id of a process that has exited."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def test_the_key_is_the_study_the_selected_series_and_the_model_version() -> None:
    key = idempotency_key(STUDY, SERIES, "m:1")
    assert key == idempotency_key(STUDY, dict(reversed(SERIES.items())), "m:1")
    assert len({key, idempotency_key(STUDY, SERIES, "m:2"), idempotency_key("1.2.3.5", SERIES, "m:1"),
                idempotency_key(STUDY, {"T1": "1.2.3.4.1"}, "m:1")}) == 4


def test_a_second_notification_finds_the_job_it_made(jobs: JobStore) -> None:
    first, new = jobs.add(STUDY, "mri_segmentation", "m:1", SERIES)
    again, new_again = jobs.add(STUDY, "mri_segmentation", "m:1", SERIES)
    assert new and not new_again and again == first
    other, new_version = jobs.add(STUDY, "mri_segmentation", "m:2", SERIES)
    assert new_version and other != first
    assert len(jobs.list(STUDY)) == 2


def test_a_claimed_job_is_leased_to_its_process_until_that_process_is_gone(jobs: JobStore) -> None:
    job_id, _ = jobs.add(STUDY, "mri_segmentation", "m:1", SERIES)
    claimed = jobs.claim()
    assert claimed is not None and claimed.job_id == job_id and claimed.job.state == "running" and claimed.job.runs == 1
    assert jobs.claim() is None  # running: not claimable at all
    assert jobs.ready_to_export(claimed, "built")
    with jobs._connect() as connection:
        connection.execute("UPDATE pacs_jobs SET lease_pid = ?", (os.getpid(),))
    assert jobs.claim() is None  # exporting, leased by a live process
    with jobs._connect() as connection:
        connection.execute("UPDATE pacs_jobs SET lease_pid = ?", (dead_pid(),))
    again = jobs.claim()
    assert again is not None and again.job.state == "exporting" and again.job.runs == 1
    assert again.attempt == claimed.attempt + 1
    assert not jobs.ready_to_export(claimed, "a superseded run's write") and jobs.renew(again)
    assert not jobs.renew(claimed) and "a superseded run's write" not in str(jobs.get(job_id).log)  # type: ignore


def test_a_restart_runs_an_interrupted_job_again_once(jobs: JobStore) -> None:
    job_id, _ = jobs.add(STUDY, "mri_segmentation", "m:1", SERIES)
    for run in range(1, MAX_RUNS + 1):
        claimed = jobs.claim()
        assert claimed is not None and claimed.job.runs == run
        requeued = jobs.recover()
        if run < MAX_RUNS:
            assert requeued == [job_id] and jobs.get(job_id).state == "queued"  # type: ignore[union-attr]
    job = jobs.get(job_id)
    assert job is not None and job.state == "failed" and job.reason == "interrupted twice"
    assert jobs.claim() is None


def test_a_job_whose_worker_died_mid_run_runs_again_once_without_a_restart(jobs: JobStore) -> None:
    job_id, _ = jobs.add(STUDY, "mri_segmentation", "m:1", SERIES)
    for run in range(1, MAX_RUNS + 1):
        claimed = jobs.claim()
        assert claimed is not None and claimed.job_id == job_id and claimed.job.runs == run
        with jobs._connect() as connection:
            connection.execute("UPDATE pacs_jobs SET lease_pid = ?", (dead_pid(),))
    assert jobs.claim() is None
    job = jobs.get(job_id)
    assert job is not None and job.state == "failed" and job.reason == "interrupted twice"
    assert "its worker ended mid-run: running it again" in [entry["message"] for entry in job.log]


def test_an_export_that_fails_waits_its_backoff_and_keeps_its_state(jobs: JobStore) -> None:
    job_id, _ = jobs.add(STUDY, "ct_classification", "c:1", {"slice": "1.2.3.4.9"})
    lease = jobs.claim()
    assert lease is not None and jobs.ready_to_export(lease, "built 2 result object(s)")
    jobs.export_failed(lease, "export failed: ConnectionError", 60.0)
    job = jobs.get(job_id)
    assert job is not None and job.state == "exporting" and job.export_failures == 1
    assert "next attempt in 60.0 s" in job.log[-1]["message"]
    assert jobs.claim() is None  # not due yet
    jobs.export_failed(lease, "export failed again", 0.0)
    again = jobs.claim()
    assert again is not None
    jobs.done(again, [{"modality": "OT"}], "stored")
    done = jobs.get(job_id)
    assert done is not None and done.state == "done" and done.results == [{"modality": "OT"}]


def test_a_job_that_could_not_read_its_series_is_queued_again_without_counting_a_run(jobs: JobStore) -> None:
    job_id, _ = jobs.add(STUDY, "ct_classification", "c:1", {"slice": "1.2.3.4.9"})
    lease = jobs.claim()
    assert lease is not None and jobs.retry_later(lease, "retrieve failed", 0.0)
    claimed = jobs.claim()
    assert claimed is not None and claimed.job.runs == 1
    jobs.fail(claimed, "bad input")
    assert jobs.get(job_id).state == "failed" and jobs.list(state="failed")  # type: ignore[union-attr]


def test_a_queue_written_before_attempts_were_counted_is_extended(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as connection:  # the columns a queue of the previous release has
        connection.execute("CREATE TABLE pacs_jobs (job_id TEXT PRIMARY KEY, idempotency_key TEXT UNIQUE NOT NULL, "
                           "study_uid TEXT NOT NULL, model_id TEXT, model_version TEXT, series_json TEXT NOT NULL, "
                           "state TEXT NOT NULL, reason TEXT, runs INTEGER NOT NULL DEFAULT 0, export_failures INTEGER "
                           "NOT NULL DEFAULT 0, not_before REAL NOT NULL DEFAULT 0, lease_pid INTEGER, results_json "
                           "TEXT, log_json TEXT NOT NULL DEFAULT '[]', created_at REAL NOT NULL, updated_at REAL NOT NULL)")
        connection.execute("INSERT INTO pacs_jobs (job_id, idempotency_key, study_uid, series_json, state, created_at, "
                           "updated_at) VALUES ('j1', 'k1', ?, '{}', 'queued', 0, 0)", (STUDY,))
    lease = JobStore(path).claim()
    assert lease is not None and lease.job_id == "j1" and lease.attempt == 1


def test_a_study_no_rule_matches_is_one_skipped_job_per_reason(jobs: JobStore) -> None:
    reason = "no rule matched: ct_classification: slice: no series with modality CT"
    first, _ = jobs.add(STUDY, None, None, {}, state="skipped", reason=reason)
    again, new = jobs.add(STUDY, None, None, {}, state="skipped", reason=reason)
    assert again == first and not new
    job = jobs.get(first)
    assert job is not None and job.state == "skipped" and job.log[0]["message"] == reason
    assert jobs.claim() is None


def test_notifications_are_deduplicated_leased_retried_and_handled_again_when_renewed(jobs: JobStore) -> None:
    jobs.notice(STUDY)
    jobs.notice(STUDY)
    claimed = jobs.claim_notice()
    assert claimed is not None and claimed[0] == STUDY
    assert jobs.claim_notice() is None  # leased
    assert jobs.notice_failed(STUDY, 0.0) == 1 and jobs.notice_failures(STUDY) == 1
    study, received = jobs.claim_notice()  # type: ignore[misc]
    jobs.notice(STUDY)  # notified again while being handled
    jobs.notice_handled(study, received)
    renewed = jobs.claim_notice()
    assert renewed is not None and renewed[1] != received
    jobs.notice_handled(*renewed)
    assert jobs.claim_notice() is None and jobs.notice_failures(STUDY) == 0


def test_cursors_persist(jobs: JobStore) -> None:
    assert jobs.cursor("orthanc_changes") is None
    jobs.set_cursor("orthanc_changes", 41)
    jobs.set_cursor("orthanc_changes", 42)
    assert JobStore(jobs.path).cursor("orthanc_changes") == 42


def test_the_shipped_yaml_loads_and_secrets_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(ROOT / "deploy" / "pacs" / "pacs.yaml")
    assert {rules.model_id for rules in config.models} == {"mri_segmentation", "ct_classification"}
    assert set(config.models[0].series) == {"T1", "T1ce", "T2", "FLAIR"}
    assert config.store_to is config.source
    monkeypatch.delenv("NEURONOVA_PACS_PASSWORD", raising=False)
    monkeypatch.setenv("NEURONOVA_PACS_USER", "neuronova")
    with pytest.raises(KeyError, match="NEURONOVA_PACS_PASSWORD"):
        config.source.headers()
    monkeypatch.setenv("NEURONOVA_PACS_PASSWORD", "secret")
    assert config.source.headers() == {"Authorization": "Basic bmV1cm9ub3ZhOnNlY3JldA=="}
    monkeypatch.setenv("TOKEN", "abc")
    assert EndpointAuth(kind="bearer", token_env="TOKEN").headers() == {"Authorization": "Bearer abc"}
    monkeypatch.setenv("NEURONOVA_PACS_TOKEN", "t0k3n")
    assert config.notify_token() == "t0k3n"


@pytest.mark.parametrize("change, message", [
    ({"models": []}, "at least 1"),
    ({"source": {"url": "http://x", "auth": {"kind": "basic", "username_env": "U"}}}, "password_env"),
    ({"ae_title": "A" * 17}, "ae_title"),
    ({"unknown": 1}, "unknown"),
])
def test_a_wrong_config_is_refused_when_read(change: dict, message: str) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "pacs" / "pacs.yaml").read_text())
    with pytest.raises(ValidationError, match=message):
        PacsConfig.model_validate({**config, **change})


def test_export_backoff_doubles_up_to_its_maximum() -> None:
    retry = ExportRetry(initial_seconds=2, max_seconds=10)
    assert [retry.delay(n) for n in (1, 2, 3, 4, 5)] == [2, 4, 8, 10, 10]


def test_transport_failures_are_retried_and_refusals_are_not() -> None:
    def failing(exc: Exception):
        @_calling("probe")
        def call() -> None:
            raise exc
        return call

    def http_error(status: int) -> requests.HTTPError:
        response = requests.Response()
        response.status_code = status
        return requests.HTTPError(response=response)

    with pytest.raises(PacsUnavailable, match="ConnectionError"):
        failing(requests.ConnectionError())()
    with pytest.raises(PacsUnavailable, match="HTTP 503"):
        failing(http_error(503))()
    with pytest.raises(PacsRefused, match="HTTP 400"):
        failing(http_error(400))()


def test_an_unreachable_pacs_fails_fast_for_the_queue_to_retry() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = DicomWebEndpoint(url=f"http://127.0.0.1:{port}/dicom-web", timeout_seconds=5)
    pacs = DicomWebPacs(endpoint, endpoint)
    started = time.monotonic()
    with pytest.raises(PacsUnavailable, match="ConnectionError"):
        pacs.study_series("1.2.3")
    with pytest.raises(PacsUnavailable, match="ConnectionError"):
        pacs.store("1.2.3", [dcmread(get_testdata_file("CT_small.dcm"))])
    assert time.monotonic() - started < 5  # no client-side retries (dicomweb-client's own took 30 s)


def test_a_series_past_the_retrieval_limits_is_refused_as_it_arrives(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instances are counted and their pixel bytes summed while they stream in; the retrieval stops at the limit."""
    instance = dcmread(get_testdata_file("CT_small.dcm"))
    pulled = []

    class Source:
        def iter_series(self, study_uid: str, series_uid: str):
            for _ in range(100):
                pulled.append(1)
                yield instance

    monkeypatch.setattr(dicomweb, "_client", lambda endpoint: Source())
    endpoint = DicomWebEndpoint(url="http://pacs.invalid/dicom-web")
    assert len(DicomWebPacs(endpoint, endpoint).retrieve("1.2", "1.2.3")) == 100  # within the defaults
    for limits in (RetrievalLimits(max_instances_per_series=10), RetrievalLimits(max_bytes_per_series=
                                                                               5 * len(instance.PixelData))):
        pulled.clear()
        with pytest.raises(ImageTooLarge) as refused:
            DicomWebPacs(endpoint, endpoint, limits).retrieve("1.2", "1.2.3")
        assert refused.value.details["reason"] == "pacs_retrieval_limit" and len(pulled) <= 11
