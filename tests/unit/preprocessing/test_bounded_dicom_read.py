"""Every DICOM parse is bounded: garbage (runs of zeros, a command set, an endless meta group) is refused or cut short
after a few elements, and every bundled pydicom file still reads exactly as `dcmread` reads it."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.tag import BaseTag

from preprocessing import dicom as dicom_module
from preprocessing.dicom import could_be_dicom, is_headerless_dicom_image, read_dicom

PREFIX = bytes(128) + b"DICM"
META = b"\x02\x00\x10\x00UI\x14\x001.2.840.10008.1.2.1\x00"  # (0002,0010) Explicit VR Little Endian


def _bundled() -> list[Path]:
    return sorted((Path(pydicom.data.__file__).parent / "test_files").glob("*.dcm"))


@pytest.mark.parametrize("path", _bundled(), ids=lambda p: p.name)
def test_bundled_files_read_as_dcmread_reads_them(path: Path) -> None:
    try:
        expected = pydicom.dcmread(path, force=True)
    except Exception:  # noqa: BLE001 - files pydicom itself cannot read are not ours to compare
        pytest.skip("pydicom cannot read it")
    assert set(read_dicom(path.read_bytes()).keys()) == set(expected.keys())


@pytest.mark.parametrize("data", [bytes(2**20), PREFIX + bytes(2**20), bytes(2**20) + PREFIX],
                         ids=["zeros", "prefix+zeros", "zeros+prefix"])
def test_a_leading_command_set_is_refused_before_pydicom_reads_it(data: bytes) -> None:
    with pytest.raises(ValueError, match="command set"):
        read_dicom(data)
    assert not is_headerless_dicom_image(data)


def test_an_endless_file_meta_group_is_refused() -> None:
    with pytest.raises(ValueError, match="meta"):
        read_dicom(PREFIX + META * 100)


def test_garbage_after_a_valid_meta_group_stops_after_a_few_elements(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []
    bounded = dicom_module._bounded_read

    def counting():
        stop = bounded()

        def spy(tag: BaseTag, vr: str | None, length: int) -> bool:
            asked.append(int(tag))
            return stop(tag, vr, length)
        return spy

    monkeypatch.setattr(dicom_module, "_bounded_read", counting)
    dataset = read_dicom(PREFIX + META + b"\x08\x00\x05\x00" + bytes(8 * 100_000))
    assert len(asked) <= 4 and "PixelData" not in dataset


def test_the_stop_rule_follows_tag_order_and_a_count() -> None:
    stop = dicom_module._bounded_read()
    assert [stop(BaseTag(t), None, 0) for t in (0x00080005, 0x00080005, 0x00080016, 0x00100010)] == [False] * 4
    assert stop(BaseTag(0x00080020), None, 0)  # lower than the tag before
    stop = dicom_module._bounded_read()
    assert [stop(BaseTag(0), None, 0) for _ in range(3)] == [False, False, True]  # one tag again and again
    stop = dicom_module._bounded_read()
    assert not any(stop(BaseTag(t), None, 0) for t in range(1, dicom_module.MAX_TOP_LEVEL_ELEMENTS + 1))
    assert stop(BaseTag(0x7FE00010), None, 0)


def test_could_be_dicom_looks_at_the_prefix_or_the_first_group() -> None:
    assert could_be_dicom(PREFIX + META)
    assert could_be_dicom(b"\x08\x00\x05\x00CS") and could_be_dicom(b"\x00\x08\x00\x05CS")  # little, big endian
    assert not could_be_dicom(bytes(1024)) and not could_be_dicom(b"PK\x03\x04") and not could_be_dicom(b"\x08")
