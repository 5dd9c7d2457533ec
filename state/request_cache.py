"""A bounded, expiring cache of recent requests' prepared inputs, shared by all API workers: files in the data dir,
or, with replicas, on the shared volume (`distributed.shared_dir`), so any replica explains or records feedback on a
request another one answered.

Safe with writers on several hosts: an entry is one write-once file named by its request id's hash, written under
a unique temporary name and renamed into place (atomic on POSIX and NFS, and NFS's close-to-open consistency shows a
reader the whole file); there is no index file, so nothing is read-modified-written; sweeps by several workers only
unlink, and a vanished file is skipped.

`/xai/explain` explains an earlier request from it, and `/feedback` copies the de-identified input from it into the
feedback store. Entries hold pixels and model facts only: no patient identifiers.

Entry sizes (uncompressed .npz): a CT slice is well under 1 MB; an MRI request keeps its model-input tensor as
float16 and its mask as uint8, 2 x sequences x model-grid voxels + input voxels bytes: a 240x240x155 study is 11 MB
with the demo model (3 mm grid), 77 MB with a 1 mm model. So the cache is bounded in bytes as well as in entries.

Sweeping the directory costs a stat per entry (a 256-entry sweep was 14 % of an API worker's CPU under CT load when
it ran on every put), so each worker sweeps after every `SWEEP_FRACTION`-th of the entry bound or of the byte bound
it has written since its last sweep: a CT entry every 8 puts at the defaults, a tens-of-MB MRI entry at once.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import DependencyUnavailable, NotFound
from core.settings import Settings
from state.dependency_health import Breaker, file_io_on

log = logging.getLogger("neuronova.request_cache")
NOT_CACHED_WARNING = "this answer could not be kept for /xai/explain and /feedback (the shared volume is unavailable)"
TEMP_SUFFIX = ".tmp"
SWEEP_FRACTION = 32
"""A worker sweeps once it has written 1/32 of either bound since its last sweep; between sweeps the cache can hold
that much more than its bounds, per worker."""


@dataclass(frozen=True)
class CachedRequest:
    """What an earlier prediction saw and answered."""

    request_id: str
    model_id: str
    model_version: str
    input_sha256: str
    arrays: dict[str, np.ndarray]
    facts: dict[str, Any]


def cache_directory(settings: Settings) -> Path:
    """`<shared_dir>/request_cache` with replicas, else `<data_dir>/request_cache`."""
    shared = settings.distributed.shared_dir if settings.distributed.enabled else None
    return Path(shared or settings.data_dir) / "request_cache"


class RequestCache:
    """At most `max_entries` requests and `max_bytes` on disk (the newest entry is always kept, whatever its size;
    up to 1/SWEEP_FRACTION more of each per worker between sweeps), each kept `ttl_seconds`; the oldest are evicted
    first."""

    def __init__(self, directory: Path, max_entries: int, ttl_seconds: float, max_bytes: int,
                 volume: Breaker | None = None) -> None:
        self.directory = directory
        self.volume = volume
        """The shared volume's breaker where the cache lives there (replicas): its I/O errors answer 503."""
        self.max_entries = max_entries
        self.ttl_seconds = ttl_seconds
        self.max_bytes = max_bytes
        self._unswept_entries = 0
        self._unswept_bytes = 0
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, request_id: str, owner: str = "") -> Path:
        key = f"{owner}\n{request_id}" if owner else request_id
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.npz"

    def put(self, entry: CachedRequest, owner: str = "") -> None:
        """Keep `entry` for its `owner` (the token subject of the request; "" without auth): the same request id of
        another owner is another entry, which neither overwrites nor reads this one."""
        buffer = io.BytesIO()
        meta = {"request_id": entry.request_id, "owner": owner, "model_id": entry.model_id,
                "model_version": entry.model_version, "input_sha256": entry.input_sha256, "facts": entry.facts}
        np.savez(buffer, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **entry.arrays)
        path = self._path(entry.request_id, owner)
        with file_io_on(self.volume):
            handle, temp = tempfile.mkstemp(dir=self.directory, prefix=f".{path.stem}.", suffix=TEMP_SUFFIX)
            with os.fdopen(handle, "wb") as stream:
                stream.write(buffer.getvalue())
            os.replace(temp, path)
        self._unswept_entries += 1
        self._unswept_bytes += buffer.tell()
        if (self._unswept_entries * SWEEP_FRACTION >= self.max_entries
                or self._unswept_bytes * SWEEP_FRACTION >= self.max_bytes):
            self._evict()

    def remember(self, entry: CachedRequest, owner: str = "") -> bool:
        """`put`, unless the shared volume is unavailable: then False (logged). An answer stands without its entry;
        `/xai/explain` or `/feedback` on it later answers 404 (or 503 while the volume is still down)."""
        try:
            self.put(entry, owner)
        except DependencyUnavailable:
            log.warning("request %s not cached: the shared volume is unavailable", entry.request_id)
            return False
        return True

    def get(self, request_id: str, owner: str = "") -> CachedRequest:
        """`owner`'s cached request, or NotFound once it has expired or been evicted, or never existed for this owner
        (another owner's entry of the same id gets the same answer)."""
        path = self._path(request_id, owner)
        try:
            with file_io_on(self.volume):
                if time.time() - path.stat().st_mtime > self.ttl_seconds:
                    path.unlink(missing_ok=True)
                    raise FileNotFoundError
                with np.load(path) as stored:
                    arrays = {k: stored[k] for k in stored.files if k != "__meta__"}
                    meta = json.loads(stored["__meta__"].tobytes())
        except FileNotFoundError:
            raise NotFound("this request_id is not in the explanation cache (expired, evicted or unknown)",
                           {"ttl_seconds": self.ttl_seconds, "max_entries": self.max_entries}) from None
        if meta["request_id"] != request_id or meta.get("owner", "") != owner:
            raise NotFound("this request_id is not in the explanation cache")
        return CachedRequest(meta["request_id"], meta["model_id"], meta["model_version"], meta["input_sha256"],
                             arrays, meta["facts"])

    def _evict(self) -> None:
        """Drop expired entries and the oldest beyond the bounds (other workers may be deleting at the same time)."""
        self._unswept_entries = self._unswept_bytes = 0
        entries = []
        with os.scandir(self.directory) as listing:
            for item in listing:
                try:
                    stat = item.stat()
                except FileNotFoundError:
                    continue
                if item.name.endswith(TEMP_SUFFIX) and time.time() - stat.st_mtime > self.ttl_seconds:
                    Path(item.path).unlink(missing_ok=True)  # a writer that died between write and rename
                if not item.name.endswith(".npz"):
                    continue
                entries.append((stat.st_mtime, stat.st_size, Path(item.path)))
        entries.sort()
        now, total = time.time(), sum(size for _, size, _ in entries)
        for index, (mtime, size, path) in enumerate(entries):
            newest = index == len(entries) - 1
            if (len(entries) - index > self.max_entries or now - mtime > self.ttl_seconds
                    or (total > self.max_bytes and not newest)):
                path.unlink(missing_ok=True)
                total -= size
