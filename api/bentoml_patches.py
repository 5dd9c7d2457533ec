"""Every change this project makes to BentoML's (and uvicorn's) behaviour, installed by one explicit call.

Each patch replaces or wraps a private part of BentoML 1.4.40 (docs/bentoml-pitfalls.md, "Patches"): written against
that version's code, so `install` refuses any other version loudly instead of patching code it was never checked
against. Nothing is patched on import: `service.py` calls `install(routes)` as it loads, which every process of a
server does (the arbiter, the API workers and each runner's workers all import the bento's entry module), before
BentoML builds any app or dispatcher; a second call installs nothing twice. In-process users of a runner (tests)
call `install()` themselves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import bentoml

from api import accept_balance, log_redaction, metric_labels
from runners import batching
from runners.local_callers import cache_local_callers
from runners.media_types import cache_media_types
from runners.tracing import trace_only_when_exported

PINNED_BENTOML = "1.4.40"
"""The BentoML version every patch was written and tested against (requirements.txt pins the same)."""
ENDPOINT_LABELS = "endpoint_labels"

PATCHES: dict[str, Callable[[], None]] = {
    "dispatcher_no_wait": batching.never_hold_lone_requests,
    "media_type_cache": cache_media_types,
    "local_caller_cache": cache_local_callers,
    "tracing_only_when_exported": trace_only_when_exported,
    "validation_log_redaction": log_redaction.install,
    "least_connections_accept": accept_balance.install,
}
"""The patches every process takes, by name (docs/bentoml-pitfalls.md P1-P6); the API's endpoint labels (P7) need
the service's routes and are installed when `install` is given them."""

_installed: set[str] = set()
_lock = threading.Lock()


def check_version(found: str) -> None:
    """Refuse a BentoML other than the pinned one (RuntimeError naming both)."""
    if found != PINNED_BENTOML:
        raise RuntimeError(
            f"BentoML {found} is installed but NeuroNova's BentoML patches were written for BentoML {PINNED_BENTOML} "
            f"only: install bentoml=={PINNED_BENTOML} (requirements.txt), or recheck every patch listed in "
            "docs/bentoml-pitfalls.md against the new version and update api/bentoml_patches.PINNED_BENTOML")


def install(routes: Iterable[str] | None = None) -> frozenset[str]:
    """Check the BentoML version, then install each patch not yet installed in this process; with `routes` (the
    API service's route paths) also the bounded endpoint labels of BentoML's request metrics. Returns the names
    installed so far."""
    check_version(bentoml.__version__)
    with _lock:
        for name, apply in PATCHES.items():
            if name not in _installed:
                apply()
                _installed.add(name)
        if routes is not None and ENDPOINT_LABELS not in _installed:
            metric_labels.install(routes)
            _installed.add(ENDPOINT_LABELS)
        return frozenset(_installed)
