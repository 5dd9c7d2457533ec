"""An uploaded model export is measured before BentoML unpacks it: a real export passes, a decompression bomb or an
export expanding past its ratio is refused early with 413, a file that is no archive with 400; a card may name files
inside its model folder only."""

from __future__ import annotations

import io
import lzma
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from core.cards.classification import ClassificationCard
from core.errors import ImageTooLarge, InvalidRequest
from state.model_exports import check_unpacked_size
from core.settings import LimitSettings

DEMO = Path(__file__).resolve().parents[3] / "demo_models" / "neuronova-mri.bentomodel"
LIMITS = LimitSettings()


def tar_xz(members: dict[str, bytes], path: Path) -> Path:
    with tarfile.open(path, "w:xz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_a_real_export_passes() -> None:
    unpacked = check_unpacked_size(DEMO, LIMITS.model_unpacked_max_bytes, LIMITS.archive_max_compression_ratio)
    assert DEMO.stat().st_size < unpacked < LIMITS.archive_max_compression_ratio * DEMO.stat().st_size


def test_a_bomb_is_refused_before_it_is_unpacked(tmp_path: Path) -> None:
    """64 MiB of zeros in a few kB of xz: refused at the ratio, long before the whole of it is read."""
    bomb = tar_xz({"model.onnx": bytes(64 * 2**20)}, tmp_path / "bomb.bentomodel")
    assert bomb.stat().st_size < 64 * 2**10
    started = time.process_time()
    with pytest.raises(ImageTooLarge) as refused:
        check_unpacked_size(bomb, LIMITS.model_unpacked_max_bytes, LIMITS.archive_max_compression_ratio)
    assert refused.value.details["reason"] == "model_export_unpacked_too_large"
    assert refused.value.details["limit_bytes"] == int(bomb.stat().st_size * LIMITS.archive_max_compression_ratio)
    assert time.process_time() - started < 5  # the tar header says the size: nothing is decompressed to learn it


def test_the_absolute_cap_holds_for_incompressible_exports(tmp_path: Path) -> None:
    export = tar_xz({"model.onnx": bytes(range(256)) * 4096}, tmp_path / "model.bentomodel")
    with pytest.raises(ImageTooLarge):
        check_unpacked_size(export, max_bytes=2**19, max_ratio=10**6)
    zipped = tmp_path / "model.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("model.onnx", bytes(2**20))
    with pytest.raises(ImageTooLarge):
        check_unpacked_size(zipped, max_bytes=2**19, max_ratio=10**6)
    assert check_unpacked_size(zipped, max_bytes=2**21, max_ratio=10**6) == 2**20


def test_a_file_that_is_no_archive_is_a_bad_request(tmp_path: Path) -> None:
    garbage = tmp_path / "model.bentomodel"
    garbage.write_bytes(lzma.compress(b"not a tar") + b"trailing")
    with pytest.raises(InvalidRequest):
        check_unpacked_size(garbage, LIMITS.model_unpacked_max_bytes, LIMITS.archive_max_compression_ratio)


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "weights/../../x.pt", "C:\\\\model.onnx",
                                  "sub\\\\..\\\\x"])
def test_a_card_names_files_inside_its_model_folder_only(name: str) -> None:
    card = {"name": "x", "intended_use": "demo", "labels": ["Glioma", "No Tumor"],
            "provenance": {"source": "t", "synthetic_data": True}}
    assert ClassificationCard.model_validate({**card, "model_file": "nets/model.onnx"}).model_file == "nets/model.onnx"
    with pytest.raises(ValueError, match="inside the model folder"):
        ClassificationCard.model_validate({**card, "model_file": name})
    with pytest.raises(ValueError, match="inside the model folder"):
        ClassificationCard.model_validate({**card, "torch": {"weights_file": name}})
