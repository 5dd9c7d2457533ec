"""Urgent PACS jobs (a model rule's `priority`, state/pacs_jobs.py): claimed before every routine job waiting, first-in
first-out otherwise; the priority is shown on the job, kept by a file from before priorities, and checked in the
configuration."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from pydantic import ValidationError

from pydicom import dcmread
from pydicom.data import get_testdata_file

from state.tasks import TaskStore
from pacs.config import PacsConfig
from pacs.dicomweb import StudySeries
from pacs.flow import PacsFlow
from state.pacs_jobs import JobStore
from pacs.selection import ModelRules
from tests.unit.pacs.test_flow import ScriptedPacs

ROOT = Path(__file__).resolve().parents[3]
MODEL = "mri_segmentation"


def queue_study(jobs: JobStore, index: int, priority: str = "routine") -> str:
    job_id, new = jobs.add(f"1.2.3.{index}", MODEL, "m:1", {"T1": f"1.2.3.{index}.1"}, priority=priority)
    assert new
    return job_id


def test_an_urgent_job_is_claimed_before_ten_routine_ones_queued_earlier(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path / "jobs.sqlite3")
    routine = [queue_study(jobs, index) for index in range(10)]
    urgent = queue_study(jobs, 10, "urgent")
    claimed = jobs.claim()
    assert claimed is not None and claimed.job_id == urgent and claimed.job.priority == "urgent"
    jobs.done(claimed, [], "stored")
    assert [jobs.claim().job_id for _ in routine] == routine  # then first-in first-out
    assert jobs.claim() is None


def test_urgent_jobs_run_in_their_order_too_and_show_their_priority(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path / "jobs.sqlite3")
    first, second = queue_study(jobs, 1, "urgent"), queue_study(jobs, 2, "urgent")
    routine = queue_study(jobs, 3)
    assert [jobs.claim().job_id for _ in range(3)] == [first, second, routine]
    assert jobs.get(routine).priority == "routine" and jobs.get(first).priority == "urgent"
    assert jobs.get(first).model_dump(mode="json")["priority"] == "urgent"  # GET /pacs/jobs/{id}


def test_a_job_store_from_before_priorities_gains_the_column_with_its_jobs_routine(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as old:  # the table as it was, with one queued job
        old.execute("CREATE TABLE pacs_jobs (job_id TEXT PRIMARY KEY, idempotency_key TEXT UNIQUE NOT NULL, "
                    "study_uid TEXT NOT NULL, model_id TEXT, model_version TEXT, series_json TEXT NOT NULL, "
                    "state TEXT NOT NULL, reason TEXT, runs INTEGER NOT NULL DEFAULT 0, export_failures INTEGER NOT "
                    "NULL DEFAULT 0, not_before REAL NOT NULL DEFAULT 0, lease_pid INTEGER, results_json TEXT, "
                    "log_json TEXT NOT NULL DEFAULT '[]', created_at REAL NOT NULL, updated_at REAL NOT NULL)")
        old.execute("INSERT INTO pacs_jobs (job_id, idempotency_key, study_uid, model_id, model_version, series_json, "
                    "state, created_at, updated_at) VALUES ('old', 'k', '1.2.3', ?, 'm:1', '{}', 'queued', 1, 1)",
                    (MODEL,))
    jobs = JobStore(path)
    assert jobs.get("old").priority == "routine"
    urgent = queue_study(jobs, 9, "urgent")
    assert [jobs.claim().job_id for _ in range(2)] == [urgent, "old"]
    JobStore(path)  # opening it again changes nothing


def test_a_rule_names_its_priority_and_a_wrong_one_is_refused() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "pacs" / "pacs.yaml").read_text())
    rules = config["models"][0]
    assert PacsConfig.model_validate(config).models[0].priority == "routine"
    assert ModelRules.model_validate({**rules, "priority": "urgent"}).priority == "urgent"
    with pytest.raises(ValidationError, match="priority"):
        PacsConfig.model_validate({**config, "models": [{**rules, "priority": "stat"}]})


class LoadedSlot:
    """A model slot serving one version (the flow only asks for its tag when it queues a job)."""

    async def loaded(self) -> SimpleNamespace:
        return SimpleNamespace(tag="ct_classification:v1")


def test_a_study_matched_by_an_urgent_rule_queues_an_urgent_job(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "pacs" / "pacs.yaml").read_text())
    config["source"] = {"url": "http://pacs.invalid/dicom-web"}
    for rules in config["models"]:
        rules["priority"] = "urgent" if rules["model_id"] == "ct_classification" else "routine"
    ct = dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    jobs = JobStore(tmp_path / "jobs.sqlite3")
    routine = queue_study(jobs, 1)
    slots = {"ct_classification": LoadedSlot()}
    pacs = ScriptedPacs(series=[[StudySeries(str(ct.SeriesInstanceUID), 1, ct)]])
    tasks = TaskStore(tmp_path / "tasks.sqlite3")
    flow = PacsFlow(PacsConfig.model_validate(config), jobs, slots, tasks, None,  # type: ignore[arg-type]
                    tmp_path / "results", pacs)  # type: ignore[arg-type]
    (job_id,) = asyncio.run(flow.resolve(str(ct.StudyInstanceUID)))
    assert jobs.get(job_id).priority == "urgent" and jobs.get(job_id).model_id == "ct_classification"
    assert [jobs.claim().job_id for _ in range(2)] == [job_id, routine]
