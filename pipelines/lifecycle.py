"""Model lifecycle on the API side: switch a route to another stored version (or an uploaded export), roll back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from typing import Any

from pydantic import BaseModel, Field

from pipelines.runner_slots import ModelSlot
from core import store
from state import active_models, model_exports, replica_models
from core.errors import InvalidRequest, ModelNotLoaded
from core.schemas import ReplicaSwitch
from core.settings import LimitSettings, get_settings

SWITCH_TIMEOUT_S = 120.0
POLL_INTERVAL_S = 0.2
REPLICAS_WAIT_S = 10.0
"""How long a switch's answer waits for the other replicas to take it (or fail to) before saying where they are."""


class UpdateModelResponse(BaseModel):
    success: bool
    model_id: str
    old_version: str
    new_version: str
    reload_time_ms: float
    message: str
    replicas: list[ReplicaSwitch] = Field(default_factory=list, description=(
        "every live replica (this one in embedded mode) with the version it serves and whether it switched"))


def import_export_file(path: Path, sha256: str, limits: LimitSettings, slot: ModelSlot) -> str:
    """Import an exported model (`bentoml models export`) for `slot` after checking its sha256 and what it unpacks
    to; return its tag. Staged, checked, then published: an export whose card is not a valid card of the slot's
    model is deleted from the store again, and only a checked one is published on the shared volume for the other
    replicas (`state.model_exports`). Blocking (hashing and unpacking up to gigabytes): call it in a thread."""
    digest = model_exports.file_sha256(path)
    if digest != sha256.lower():
        raise InvalidRequest("model file checksum mismatch", {"expected_sha256": sha256, "actual_sha256": digest})
    model_exports.check_unpacked_size(path, limits.model_unpacked_max_bytes, limits.archive_max_compression_ratio)
    try:
        tag = store.import_model(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable export is the caller's input error
        raise InvalidRequest(f"not an exported BentoML model: {type(exc).__name__}") from exc
    try:
        store.read_card(store.get_model(tag), slot.card_type)
    except Exception as exc:  # noqa: BLE001 - a card of another task or a broken card leaves nothing behind
        store.delete_model(tag)
        raise InvalidRequest(f"the uploaded model is not a {slot.model_id} model: {type(exc).__name__}") from exc
    model_exports.publish(path, digest, tag)
    return tag


def resolve_target(slot: ModelSlot, old_tag: str, version: str | None, rollback: bool) -> str:
    """The stored tag to switch to: the previous one on rollback, else `version` (a tag, or a version of this model)."""
    if rollback:
        target = active_models.previous_tag(slot.model_id)
        if target is None:
            raise InvalidRequest(f"{slot.model_id} has no earlier version to roll back to")
    elif version:
        target = version if ":" in version else f"{old_tag.split(':')[0]}:{version}"
    else:
        raise InvalidRequest("give a version (model store tag), a model_file with its sha256, or rollback=true")
    try:
        stored = model_exports.local_model(target)
    except ModelNotLoaded as exc:
        raise InvalidRequest(exc.message, exc.details) from exc
    try:
        store.read_card(stored, slot.card_type)
    except Exception as exc:  # noqa: BLE001 - a card of another task or a broken card is refused before switching
        raise InvalidRequest(f"{stored.tag} is not a {slot.model_id} model: {type(exc).__name__}") from exc
    return str(stored.tag)


async def switch_model(slot: ModelSlot, new_tag: str, old_tag: str) -> UpdateModelResponse:
    """Record the switch, wait until this replica's runner serves `new_tag`, then (bounded) for the other replicas;
    if this replica cannot load it, switch back and say why. `replicas` says where each replica stands."""
    started = time.perf_counter()
    await asyncio.to_thread(active_models.record_switch, slot.model_id, new_tag, old_tag)
    deadline = time.monotonic() + SWITCH_TIMEOUT_S
    while time.monotonic() < deadline:
        described = await slot.describe()
        if described.get("tag") == new_tag:
            slot.forget()
            return UpdateModelResponse(
                success=True, model_id=slot.model_id, old_version=old_tag, new_version=new_tag,
                reload_time_ms=round((time.perf_counter() - started) * 1000.0, 1),
                message=f"{slot.model_id} now serves {new_tag}; roll back with rollback=true",
                replicas=await replica_switches(slot.model_id, new_tag, described, REPLICAS_WAIT_S),
            )
        if described.get("last_error"):
            break
        await asyncio.sleep(POLL_INTERVAL_S)
    replicas = await replica_switches(slot.model_id, new_tag, described, 0.0)
    await asyncio.to_thread(active_models.record_switch, slot.model_id, old_tag, new_tag)
    return UpdateModelResponse(
        success=False, model_id=slot.model_id, old_version=old_tag, new_version=old_tag,
        reload_time_ms=round((time.perf_counter() - started) * 1000.0, 1),
        message=f"{new_tag} did not load ({described.get('last_error') or 'timeout'}); {old_tag} keeps serving",
        replicas=replicas,
    )


async def replica_switches(model_id: str, target: str, here: dict[str, Any], wait_s: float) -> list[ReplicaSwitch]:
    """Each live replica against `target`: in distributed mode read from the shared database once every replica
    has taken the switch or failed to (at most `wait_s`, polled in a thread); embedded, this server's runner as
    `here` describes it."""
    if get_settings().distributed.enabled:
        rows = await asyncio.to_thread(replica_models.settled, model_id, target, wait_s)
    else:
        rows = [replica_models.ReplicaModel(replica=replica_models.replica_id(), tag=here.get("tag"),
                                            generation=int(here.get("generation") or 0),
                                            pending=here.get("switch_pending"),
                                            error=here.get("last_error") or here.get("error"))]
    return [ReplicaSwitch(replica=row.replica, version=row.tag, switched=row.tag == target,
                          switch_pending=row.pending, error=row.error) for row in rows]
