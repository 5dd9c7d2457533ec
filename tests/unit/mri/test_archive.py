"""Zip archives are read in memory under limits: traversal, bombs, links, nesting and encryption are refused."""

from __future__ import annotations

import io
import stat
import zipfile

import pytest

from core.errors import ImageTooLarge, InvalidImageFormat, InvalidRequest
from preprocessing.archive import is_zip, read_zip_members
from tests.unit.mri.mri_inputs import (
    patch_central_directory,
    temp_dir_entries,
    zip_bytes,
)

LIMITS = {"max_files": 10, "max_total_bytes": 1_000_000}


def test_members_are_read_in_order_skipping_folders_and_os_clutter(private_temp_dir) -> None:
    data = zip_bytes({"series/a.dcm": b"A" * 10, "__MACOSX/series/._a.dcm": b"junk", "series/b.dcm": b"B"})
    before = temp_dir_entries()
    assert is_zip(data)
    assert read_zip_members(data, **LIMITS) == [("series/a.dcm", b"A" * 10), ("series/b.dcm", b"B")]
    assert temp_dir_entries() - before == set()


@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs/path.dcm", "ok/../../x.dcm", "C:/windows/x.dcm", "..\\..\\x.dcm"])
def test_path_traversal_is_refused(name: str) -> None:
    with pytest.raises(InvalidRequest, match="leaves the archive"):
        read_zip_members(zip_bytes({"fine.dcm": b"x", name: b"y"}), **LIMITS)


def test_too_many_members_are_refused() -> None:
    with pytest.raises(ImageTooLarge, match="entries"):
        read_zip_members(zip_bytes({f"{i}.dcm": b"x" for i in range(11)}), **LIMITS)


def test_zip_bomb_is_refused_from_its_declared_size() -> None:
    bomb = zip_bytes({"zeros.dcm": b"\0" * 5_000_000})
    assert len(bomb) < 10_000
    with pytest.raises(ImageTooLarge, match="expand"):
        read_zip_members(bomb, **LIMITS)


def test_understated_sizes_are_caught_while_reading() -> None:
    data = zip_bytes({"a.dcm": b"\0" * 400_000, "b.dcm": b"\0" * 400_000}, zipfile.ZIP_STORED)
    lying = patch_central_directory(data, 24, "<I", 10)  # uncompressed size: 10 bytes each
    assert sum(info.file_size for info in zipfile.ZipFile(io.BytesIO(lying)).infolist()) == 20
    with pytest.raises(InvalidImageFormat, match="sizes are false"):
        read_zip_members(lying, max_files=10, max_total_bytes=500_000)


def _with_attributes(mode: int = 0, flags: int = 0, name: str = "link.dcm") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo(name)
        info.external_attr = mode << 16
        archive.writestr(info, b"target")
    return patch_central_directory(buffer.getvalue(), 8, "<H", flags) if flags else buffer.getvalue()


def test_symlinks_encryption_and_nested_archives_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="symbolic link"):
        read_zip_members(_with_attributes(mode=stat.S_IFLNK | 0o777), **LIMITS)
    with pytest.raises(InvalidRequest, match="encrypted"):
        read_zip_members(_with_attributes(flags=0x1), **LIMITS)
    with pytest.raises(InvalidRequest, match="another archive"):
        read_zip_members(zip_bytes({"inner.zip": zip_bytes({"a": b"b"})}), **LIMITS)


def test_damaged_and_empty_archives() -> None:
    with pytest.raises(InvalidImageFormat, match="truncated or damaged"):
        read_zip_members(zip_bytes({"a.dcm": b"x" * 1000})[:40], **LIMITS)
    with pytest.raises(InvalidImageFormat, match="no files"):
        read_zip_members(zip_bytes({}), **LIMITS)
    corrupt = bytearray(zip_bytes({"a.dcm": b"abc" * 1000}))
    corrupt[40:60] = b"\xff" * 20
    with pytest.raises(InvalidImageFormat):
        read_zip_members(bytes(corrupt), **LIMITS)
