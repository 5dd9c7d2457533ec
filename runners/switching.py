"""A runner's served model that follows `state.active_models`: hot switch and rollback without a restart."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import bentoml

from state import active_models, model_exports, replica_models
from core.errors import ModelNotLoaded
from core.settings import get_settings

log = logging.getLogger(__name__)
WATCH_INTERVAL_S = 1.0
RETRY_FIRST_S, RETRY_MAX_S = 2.0, 300.0
"""A load that failed (the registry's version, or the first) is tried again after 2 s, doubled per failure, at most
5 min: a replica short of memory for a moment catches up without an operator."""


class ServedModel(Protocol):
    """What a runner's loaded model exposes for `describe`."""

    tag: str
    card: Any
    loaded_at: str


M = TypeVar("M", bound=ServedModel)


class SwitchableModel(Generic[M]):
    """Holds the loaded model of one route and swaps in the registry's active tag when it changes.

    `default_ref` resolves the configured tag (the service's `BentoModel`, so `bentoml build` pins it); it is called
    inside the load, so a missing model is a load error, not a crash. A new version is loaded beside the old one and swapped in by one assignment, so every batch runs on one model;
    `generation` counts the swaps so callers can tell which model produced an output. A version that fails to load
    leaves the old one serving, is tried again with backoff (`RETRY_FIRST_S`), and is reported meanwhile
    (`describe`: `switch_pending`, `last_error`; the replica's /health is degraded). In distributed mode each poll
    also writes what this replica serves to the shared database (`state.replica_models`), which `/update_model` reads
    to say which replicas have switched.
    """

    def __init__(self, model_id: str, default_tag: str, default_ref: Callable[[], bentoml.Model],
                 loader: Callable[[bentoml.Model], M]) -> None:
        self.model_id = model_id
        self.default_tag = default_tag
        self.default_ref = default_ref
        self.loader = loader
        self._timing_ms = 0.0
        self._timed_items = 0
        self._served: tuple[M | None, int] = (None, 0)
        self.load_error: str | None = None
        self.pending: str | None = None
        """The version the registry asks for that has not loaded yet (retried with backoff)."""
        self._failures, self._retry_at = 0, 0.0
        self._seen_stamp = active_models.registry_stamp()
        self._settle(active_models.active_tag(model_id, default_tag), self._load)
        threading.Thread(target=self._watch, name=f"{model_id}-watch", daemon=True).start()

    @property
    def current(self) -> M | None:
        """The served model (None while none has loaded)."""
        return self._served[0]

    @property
    def generation(self) -> int:
        """How many models have been swapped in so far."""
        return self._served[1]

    def get(self) -> tuple[M, int]:
        """The served model and its generation (read together: one attribute, swapped whole), or ModelNotLoaded naming
        the load error."""
        current, generation = self._served
        if current is None:
            raise ModelNotLoaded(f"{self.model_id} model failed to load: {self.load_error}")
        return current, generation

    def _load(self, tag: str) -> bool:
        try:
            stored = self.default_ref() if tag == self.default_tag else model_exports.local_model(tag)
            loaded = self.loader(stored)
        except Exception as exc:  # noqa: BLE001 - a runner that cannot load stays up and reports why
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("%s model %s failed to load: %s", self.model_id, tag, self.load_error)
            return False
        self._served, self.load_error = (loaded, self.generation + 1), None
        log.info("%s model %s loaded (generation %d)", self.model_id, loaded.tag, self.generation)
        return True

    def _settle(self, wanted: str, load: Callable[[str], bool]) -> None:
        """`load(wanted)` and keep the outcome: done, or pending with the next try after the backoff."""
        if load(wanted):
            self.pending, self._failures, self.load_error = None, 0, None
            return
        self.pending, self._failures = wanted, self._failures + 1
        delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (self._failures - 1))
        self._retry_at = time.monotonic() + delay
        log.warning("%s: %s will be tried again in %.0f s", self.model_id, wanted, delay)

    def _watch(self) -> None:
        shared = get_settings().distributed  # a process's mode and database are fixed at its start
        while True:
            time.sleep(WATCH_INTERVAL_S)
            try:
                self.poll()
                if shared.enabled:
                    replica_models.report(self.model_id, self.state(), shared.database_url)
            except Exception as exc:  # noqa: BLE001 - a shared database briefly away: keep serving, poll again
                log.warning("%s: cannot reach the model registry: %s", self.model_id, exc)

    def poll(self) -> None:
        """Follow the registry when a switch was recorded since the last poll, or a failed load is due again."""
        stamp = active_models.registry_stamp()
        if stamp != self._seen_stamp or (self.pending is not None and time.monotonic() >= self._retry_at):
            self._seen_stamp = stamp
            self.follow_registry()

    def state(self) -> replica_models.ReplicaModel:
        """What this replica serves of the model, what it could not load yet, and why."""
        current, generation = self._served
        return replica_models.ReplicaModel(replica=replica_models.replica_id(),
                                           tag=current.tag if current is not None else None,
                                           generation=generation, pending=self.pending, error=self.load_error)

    def follow_registry(self) -> None:
        """Load the registry's active tag when it differs from the served one (a failure: see `_settle`)."""
        wanted = active_models.active_tag(self.model_id, self.default_tag)
        if self.current is not None and wanted == self.current.tag:
            self.pending, self._failures, self.load_error = None, 0, None
            return
        self._settle(wanted, self._load_stored)

    def _load_stored(self, wanted: str) -> bool:
        """Load `wanted` unless it resolves (e.g. `name:latest`) to the served version."""
        try:
            resolved = str(model_exports.local_model(wanted).tag)
        except ModelNotLoaded as exc:
            self.load_error = exc.message
            return False
        return (self.current is not None and resolved == self.current.tag) or self._load(resolved)

    def record_timing(self, started: float, items: int) -> None:
        """Add one model call (from a `time.perf_counter()` reading) to the live average."""
        self._timing_ms += (time.perf_counter() - started) * 1000.0
        self._timed_items += items

    def describe(self) -> dict[str, Any]:
        """Version, generation, card, engine, Grad-CAM layer and live timing of the served model, or why none is."""
        current, generation = self._served
        if current is None:
            return {"loaded": False, "error": self.load_error, "tag": self.default_tag}
        explainer = getattr(current, "explainer", None)
        return {
            "loaded": True,
            "tag": current.tag,
            "generation": generation,
            "card": current.card.model_dump(mode="json"),
            "engine": current.engine.name,
            "loaded_at": current.loaded_at,
            "gradcam_layer": explainer.layer_name if explainer is not None else None,
            "avg_inference_time_ms_per_image": round(self._timing_ms / self._timed_items, 3) if self._timed_items else None,
            "last_error": self.load_error,
            "switch_pending": self.pending,
        }
