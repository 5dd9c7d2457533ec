"""Uploaded model exports shared between replicas: written once to `<shared_dir>/models/<sha256>.bentomodel`, their
tag recorded in the shared database, imported into a replica's own BentoML store the first time it needs the tag.

Embedded mode has one model store, so `local_model` is `store.get_model` there.
"""

from __future__ import annotations

import hashlib
import logging
import lzma
import os
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

import bentoml
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert

from core import store

from state import shared_db
from core.errors import ImageTooLarge, InvalidRequest, ModelNotLoaded
from core.settings import get_settings

log = logging.getLogger(__name__)
EXPORT_SUFFIX = ".bentomodel"


def exports_dir() -> Path:
    shared = get_settings().distributed.shared_dir
    if shared is None:
        raise RuntimeError("distributed.shared_dir is not set (it is required with distributed.database_url)")
    return Path(shared) / "models"


def check_unpacked_size(path: Path, max_bytes: int, max_ratio: float) -> int:
    """The bytes an export (a tar, compressed or not, or a zip) unpacks to, read member by member; ImageTooLarge as
    soon as they pass `max_bytes` or `max_ratio` times the file, before BentoML unpacks anything (an xz of zeros
    expands thousands of times)."""
    limit = min(max_bytes, int(path.stat().st_size * max_ratio))
    total = 0

    def add(size: int) -> None:
        nonlocal total
        total += size
        if total > limit:
            raise ImageTooLarge("the model export unpacks to more than allowed",
                                {"limit_bytes": limit, "reason": "model_export_unpacked_too_large"})

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                add(info.file_size)
        return total
    try:
        with tarfile.open(path, "r|*") as archive:
            for member in archive:
                add(member.size)
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError) as exc:
        raise InvalidRequest(f"not an exported BentoML model: {type(exc).__name__}") from exc
    return total


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def publish(path: Path, sha256: str, tag: str) -> None:
    """Distributed mode: copy a verified export to the shared volume (once: the name is its hash; written to a unique
    temporary name, fsynced, then renamed, so no replica ever reads a partial file) and record its tag."""
    if not get_settings().distributed.enabled:
        return
    directory = exports_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{sha256.lower()}{EXPORT_SUFFIX}"
    if not target.exists():
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".upload-", suffix=".tmp", delete=False) as temp:
            with path.open("rb") as source:
                shutil.copyfileobj(source, temp, 2**20)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp.name, target)
    table = shared_db.model_exports
    with shared_db.engine().begin() as connection:
        connection.execute(insert(table).values(tag=tag, sha256=sha256.lower()).on_conflict_do_nothing())


def _shared_export(tag: str) -> Path | None:
    table = shared_db.model_exports
    with shared_db.engine().connect() as connection:
        sha256 = connection.execute(select(table.c.sha256).where(table.c.tag == tag)).scalar_one_or_none()
    return None if sha256 is None else exports_dir() / f"{sha256}{EXPORT_SUFFIX}"


def local_model(tag: str) -> bentoml.Model:
    """The stored model `tag`; in distributed mode, a tag another replica received as an upload is first imported
    from the shared volume (its hash checked again). ModelNotLoaded when neither has it."""
    try:
        return store.get_model(tag)
    except ModelNotLoaded:
        if not get_settings().distributed.enabled:
            raise
        path = _shared_export(tag)
        if path is None:
            raise
    if file_sha256(path) != path.name.removesuffix(EXPORT_SUFFIX):
        raise ModelNotLoaded(f"shared export of {tag!r} does not match its sha256", {"tag": tag, "path": str(path)})
    try:
        store.import_model(path)
        log.info("imported %s from the shared volume (%s)", tag, path.name)
    except Exception as exc:  # noqa: BLE001 - another process of this replica may have imported it at the same moment
        log.info("import of %s from %s: %s (checking the store)", tag, path.name, exc)
    return store.get_model(tag)
