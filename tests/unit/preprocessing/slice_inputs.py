"""Real inputs for the slice decoder tests: pydicom's bundled test files (as they are, or with tags edited) and
PNG/JPEG files written by Pillow. A helper module, not a conftest, so that tests can import it by a unique name."""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO
from pathlib import Path

from PIL import Image
from pydicom import dcmread, dcmwrite
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset


def bundled_dicom(name: str) -> bytes:
    """The bytes of one of pydicom's bundled test files (only bundled names: others would be downloaded)."""
    path = get_testdata_file(name)
    assert path is not None, f"{name} is not bundled with pydicom"
    return Path(path).read_bytes()


def bundled_dataset(name: str) -> Dataset:
    return dcmread(BytesIO(bundled_dicom(name)))


def edited_dicom(name: str, edit: Callable[[Dataset], None]) -> bytes:
    """A bundled file with some tags changed by `edit`, written back in its own transfer syntax."""
    dataset = bundled_dataset(name)
    edit(dataset)
    buffer = BytesIO()
    dcmwrite(buffer, dataset)
    return buffer.getvalue()


def encoded_image(image: Image.Image, image_format: str, **save_options: object) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format=image_format, **save_options)
    return buffer.getvalue()

