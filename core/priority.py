"""Urgent work overtakes routine work waiting for the same resource: the priority of an MRI task (a request field) or
a PACS job (a model rule).

Every queue orders by (rank, descending; then arrival): the slot gate of an API worker's MRI tasks in embedded mode
(`pipelines.priority_gate`), the PACS job table (`state.pacs_jobs`) and, in
distributed mode, procrastinate's job table (its `priority` column: higher runs first). Work already running is never
interrupted.
"""

from __future__ import annotations

from typing import Literal

Priority = Literal["routine", "urgent"]
ROUTINE: Priority = "routine"
RANK: dict[Priority, int] = {"routine": 0, "urgent": 1}
"""A priority's rank in every queue: higher starts first (procrastinate's convention)."""


def priority_of(rank: int) -> Priority:
    """The priority whose rank is `rank`."""
    return "urgent" if rank >= RANK["urgent"] else ROUTINE
