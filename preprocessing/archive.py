"""Safe reading of uploaded zip archives, entirely in memory: nothing is extracted to disk.

Refused before anything is decompressed: more members than allowed, a declared total size over the limit, a
declared total over `max_ratio` times the compressed total (real DICOM and NIfTI deflate 2-5x; a bomb of zeros ~1000x),
absolute or `..` paths (traversal), symbolic links, encrypted members and nested archives. With `accepts`, only
the head (`HEAD_BYTES`) of each member is decompressed first and a member whose head it refuses (one that cannot
be a DICOM or NIfTI file) is refused before the rest is decompressed or parsed. zipfile never yields more than a
member's declared size (the CRC check fails instead), so an archive whose headers understate its sizes is refused
as damaged without expanding past the limit.
"""

from __future__ import annotations

import io
import stat
import zipfile
from collections.abc import Callable
from pathlib import PurePosixPath

from core.errors import ImageTooLarge, InvalidImageFormat, InvalidRequest

ZIP_SIGNATURE = b"PK\x03\x04"
_EMPTY_ZIP_SIGNATURE = b"PK\x05\x06"
_SKIPPED_NAMES = ("__MACOSX/", ".DS_Store", "Thumbs.db")
HEAD_BYTES = 1024
"""Enough for the DICOM preamble and magic (132 bytes) and a NIfTI-1/-2 header (348/540 bytes)."""
DEFAULT_MAX_RATIO = 100.0


def is_zip(data: bytes) -> bool:
    return data.startswith((ZIP_SIGNATURE, _EMPTY_ZIP_SIGNATURE))


def read_zip_members(
    data: bytes, *, max_files: int, max_total_bytes: int, max_ratio: float = DEFAULT_MAX_RATIO,
    accepts: Callable[[bytes], bool] | None = None,
) -> list[tuple[str, bytes]]:
    """(member name, bytes) of every regular file in the archive, in archive order, after all safety checks."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InvalidImageFormat("The zip archive could not be read: it is truncated or damaged.",
                                 {"format": "zip", "reason": type(exc).__name__}) from exc
    files = [info for info in infos if not info.is_dir() and not _skipped(info.filename)]
    _check_listing(infos, files, max_files, max_total_bytes, max_ratio)
    if accepts is not None:
        for info in files:
            _check_head(archive, info, accepts)
    members = [(info.filename, _read_member(archive, info)) for info in files]
    if not members:
        raise InvalidImageFormat("The zip archive holds no files.", {"format": "zip"})
    return members


def _skipped(name: str) -> bool:
    return any(part in name for part in _SKIPPED_NAMES)


def _check_listing(
    infos: list[zipfile.ZipInfo], files: list[zipfile.ZipInfo], max_files: int, max_total: int, max_ratio: float
) -> None:
    if len(infos) > max_files:
        raise ImageTooLarge(f"The zip archive holds {len(infos)} entries; at most {max_files} are accepted.",
                            {"entries": len(infos), "max_entries": max_files})
    declared = sum(info.file_size for info in files)
    if declared > max_total:
        raise ImageTooLarge(f"The zip archive would expand to {declared} bytes; at most {max_total} are accepted.",
                            {"declared_bytes": declared, "max_bytes": max_total})
    compressed = sum(info.compress_size for info in files)
    if declared > max_ratio * max(compressed, 1):
        raise ImageTooLarge(f"The zip archive would expand {declared / max(compressed, 1):.0f} times; at most "
                            f"{max_ratio:.0f} times is accepted (a compression bomb?).",
                            {"declared_bytes": declared, "compressed_bytes": compressed, "max_ratio": max_ratio})
    for info in infos:
        path = PurePosixPath(info.filename.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or (path.parts and path.parts[0].endswith(":")):
            raise InvalidRequest("The zip archive has a member path that leaves the archive (absolute or '..').",
                                 {"format": "zip", "reason": "path_traversal"})
        if stat.S_ISLNK(info.external_attr >> 16):
            raise InvalidRequest("The zip archive holds a symbolic link; only regular files are accepted.",
                                 {"format": "zip", "reason": "symlink"})
        if info.flag_bits & 0x1:
            raise InvalidRequest("The zip archive is encrypted.", {"format": "zip", "reason": "encrypted"})
        if info.filename.lower().endswith((".zip", ".tar", ".tgz", ".7z", ".rar")):
            raise InvalidRequest("The zip archive holds another archive; send one flat archive.",
                                 {"format": "zip", "reason": "nested_archive"})


def _check_head(archive: zipfile.ZipFile, info: zipfile.ZipInfo, accepts: Callable[[bytes], bool]) -> None:
    """Decompress only the member's head and refuse the member when `accepts` says it cannot be a wanted file."""
    try:
        with archive.open(info) as member:
            head = member.read(HEAD_BYTES)
    except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError, RuntimeError, ValueError) as exc:
        raise InvalidImageFormat("A zip archive member could not be decompressed (damaged, or its sizes are false).",
                                 {"format": "zip", "reason": type(exc).__name__}) from exc
    if not accepts(head):
        raise InvalidImageFormat("A zip archive member is neither DICOM nor NIfTI (its first bytes were checked); it "
                                 "was not decompressed further.", {"format": "zip", "reason": "not_an_image_file",
                                                                   "declared_bytes": info.file_size})


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """zipfile stops at the member's declared size and fails the CRC when the data holds more (or less)."""
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError, RuntimeError, ValueError) as exc:
        raise InvalidImageFormat("A zip archive member could not be decompressed (damaged, or its sizes are false).",
                                 {"format": "zip", "reason": type(exc).__name__}) from exc
