"""The MRI task routes' `priority` field against the real served process: `urgent` is accepted and the task runs; a
value that is neither `routine` nor `urgent` is a 400 in the error schema, and nothing is stored. (Which task starts
first is tested where the order is deterministic: tests/unit/core/test_priority_gate.py, the queue and PACS tests.)"""

from __future__ import annotations

import sqlite3

from tests.http.test_mri_http import ROUTE, wait_for
from tests.unit.mri.mri_inputs import four_d_nifti
from training_export.synthetic_mri import synthetic_case


def test_an_urgent_task_is_accepted_and_an_unknown_priority_refused(http, server_state) -> None:
    case = synthetic_case(15, (48, 48, 32), (3.0, 3.0, 3.0))
    files = {"image": ("case.nii.gz", four_d_nifti(case, compressed=True))}

    def stored() -> int:
        with sqlite3.connect(server_state / "tasks.db") as connection:
            return connection.execute("SELECT count(*) FROM result").fetchone()[0]

    before = stored()
    for route in (f"{ROUTE}/submit", ROUTE):
        refused = http.post(route, files=files, data={"patient_id": "P000047", "priority": "stat"})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["code"] == "INVALID_REQUEST" and [e["loc"] for e in error["details"]["errors"]] == [["priority"]]
    assert stored() == before

    accepted = http.post(ROUTE, files=files, data={"patient_id": "P000047", "priority": "urgent"})
    assert accepted.status_code == 202, accepted.text
    polled = wait_for(http, accepted.json()["task_id"], {"completed", "failed"})
    assert polled["status"] == "completed", polled
