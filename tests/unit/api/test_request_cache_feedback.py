"""The shared request cache (bounded, expiring); the feedback store's tests are in test_feedback_store.py."""

import os
import time

import numpy as np
import pytest

from state.request_cache import CachedRequest, RequestCache
from core.errors import NotFound


def entry(request_id: str, value: float = 1.0) -> CachedRequest:
    return CachedRequest(
        request_id=request_id, model_id="ct_classification", model_version="neuronova-ct:v1", input_sha256="ab" * 32,
        arrays={"tensor": np.full((1, 4, 4), value, np.float32), "display": np.zeros((8, 8), np.uint8)},
        facts={"labels": ["Glioma", "No Tumor"], "predicted_class": "Glioma"},
    )


def test_cache_round_trip_and_unknown_ids(tmp_path):
    cache = RequestCache(tmp_path, max_entries=4, ttl_seconds=60, max_bytes=2**20)
    cache.put(entry("req/1 with ../odd chars", 3.0))
    got = cache.get("req/1 with ../odd chars")
    assert got.model_version == "neuronova-ct:v1" and got.facts["predicted_class"] == "Glioma"
    assert np.array_equal(got.arrays["tensor"], np.full((1, 4, 4), 3.0, np.float32))
    assert list(tmp_path.iterdir())[0].parent == tmp_path  # the id never becomes a path
    with pytest.raises(NotFound):
        cache.get("never-seen")


def test_cache_evicts_oldest_beyond_bound(tmp_path):
    cache = RequestCache(tmp_path, max_entries=3, ttl_seconds=60, max_bytes=2**20)
    for index in range(5):
        cache.put(entry(f"r{index}"))
        path = cache._path(f"r{index}")
        os.utime(path, (time.time() - 10 + index, time.time() - 10 + index))
    cache.put(entry("r5"))
    with pytest.raises(NotFound):
        cache.get("r0")
    assert cache.get("r5").request_id == "r5"
    assert len(list(tmp_path.glob("*.npz"))) == 3


def test_cache_entries_expire(tmp_path):
    cache = RequestCache(tmp_path, max_entries=3, ttl_seconds=5, max_bytes=2**20)
    cache.put(entry("old"))
    os.utime(cache._path("old"), (time.time() - 60, time.time() - 60))
    with pytest.raises(NotFound, match="expired"):
        cache.get("old")


def test_cache_is_bounded_in_bytes_but_keeps_the_newest(tmp_path):
    """MRI entries are tens of MB: the byte bound evicts the oldest, never the entry just written."""
    cache = RequestCache(tmp_path, max_entries=100, ttl_seconds=60, max_bytes=3 * 2**20)
    big = np.zeros((2**20,), np.float16)  # 2 MiB
    for index in range(3):
        cache.put(CachedRequest(f"mri{index}", "mri_segmentation", "v1", "cd" * 32, {"tensor": big}, {}))
        os.utime(cache._path(f"mri{index}"), (time.time() - 10 + index, time.time() - 10 + index))
    with pytest.raises(NotFound):
        cache.get("mri1")  # two 2 MiB entries exceed the 3 MiB bound
    assert cache.get("mri2").arrays["tensor"].nbytes == 2**21 and len(list(tmp_path.glob("*.npz"))) == 1
    huge = CachedRequest("huge", "mri_segmentation", "v1", "cd" * 32, {"tensor": np.zeros((2**21,), np.float16)}, {})
    cache.put(huge)  # larger than the whole bound: kept alone until the next entry
    assert cache.get("huge").request_id == "huge" and len(list(tmp_path.glob("*.npz"))) == 1


def test_a_large_cache_is_swept_every_few_puts_and_stays_near_its_bound(tmp_path):
    cache = RequestCache(tmp_path, max_entries=64, ttl_seconds=60, max_bytes=2**30)
    for index in range(200):
        cache.put(entry(f"r{index}"))
        assert len(list(tmp_path.glob("*.npz"))) <= 64 + 64 // 32
    assert cache.get("r199").request_id == "r199"
    with pytest.raises(NotFound):
        cache.get("r0")


def _writer(directory: str, worker: int) -> None:
    cache = RequestCache(__import__("pathlib").Path(directory), max_entries=1000, ttl_seconds=60, max_bytes=2**30)
    for index in range(40):
        cache.put(entry("one-request", float(worker)))  # every writer rewrites one id, as replicas may for one request id
        cache.put(entry(f"own-{worker}-{index}", float(index)))


def test_concurrent_writers_never_expose_a_partial_entry(tmp_path):
    """Processes standing in for replicas on one shared volume: unique temporary names and atomic renames, no index
    file, so a reader always finds a whole entry (one writer's) and every writer's own entries survive."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_writer, args=(str(tmp_path), worker)) for worker in range(3)]
    for process in writers:
        process.start()
    reader = RequestCache(tmp_path, max_entries=1000, ttl_seconds=60, max_bytes=2**30)
    seen = set()
    while any(process.is_alive() for process in writers):
        try:
            seen.add(float(reader.get("one-request").arrays["tensor"][0, 0, 0]))
        except NotFound:
            pass
    for process in writers:
        process.join()
        assert process.exitcode == 0
    assert seen <= {0.0, 1.0, 2.0}
    assert float(reader.get("one-request").arrays["tensor"][0, 0, 0]) in {0.0, 1.0, 2.0}
    assert all(reader.get(f"own-{w}-{i}").arrays["tensor"][0, 0, 0] == i for w in range(3) for i in range(40))
    assert not list(tmp_path.glob("*.tmp"))


def test_a_dead_writers_temporary_file_is_swept_after_the_ttl(tmp_path):
    cache = RequestCache(tmp_path, max_entries=1, ttl_seconds=60, max_bytes=2**20)
    stale, fresh = tmp_path / ".x.abc.tmp", tmp_path / ".y.def.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"being written")
    os.utime(stale, (time.time() - 120, time.time() - 120))
    cache.put(entry("a"))  # max_entries=1: this put sweeps
    assert not stale.exists() and fresh.exists()
