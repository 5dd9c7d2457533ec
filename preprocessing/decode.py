"""The one entry point for 2D uploads: sniff the format from the bytes, then decode DICOM, PNG or JPEG.

The filename and declared content type are never trusted; only the extension is reported back when the
content is unrecognised (the name itself may carry patient identifiers).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePath
from typing import Literal

from core.errors import InvalidImageFormat
from core.imaging import DecodedSlice
from preprocessing.dicom import decode_dicom_slice, has_dicom_prefix, is_headerless_dicom_image
from preprocessing.raster import decode_raster

SliceFormat = Literal["dicom", "png", "jpeg"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8\xff"
_EXTENSION_CHARS = 16


def sniff_format(data: bytes) -> SliceFormat | None:
    """The format the bytes are in (DICOM with or without preamble, PNG, JPEG), or None."""
    if has_dicom_prefix(data):
        return "dicom"
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data.startswith(_JPEG_SOI):
        return "jpeg"
    return "dicom" if is_headerless_dicom_image(data) else None


def decode_slice(
    data: bytes,
    filename: str | None = None,
    *,
    max_pixels: int,
    allow_multiframe: bool = False,
    modalities: Sequence[str] | None = None,
) -> DecodedSlice:
    """Decode one uploaded 2D image; raises only InvalidImageFormat (400) or ImageTooLarge (413).

    `modalities` (e.g. ("CT",)) restricts DICOM input; PNG and JPEG carry no modality and are not restricted.
    """
    if not data:
        raise InvalidImageFormat("The uploaded file is empty (0 bytes).", {"size_bytes": 0})
    image_format = sniff_format(data)
    if image_format == "dicom":
        return decode_dicom_slice(
            data, max_pixels=max_pixels, allow_multiframe=allow_multiframe, modalities=modalities
        )
    if image_format is not None:
        return decode_raster(data, max_pixels=max_pixels)
    extension = PurePath(filename).suffix.lower()[:_EXTENSION_CHARS] if filename else None
    raise InvalidImageFormat(
        "The file is not a DICOM, PNG or JPEG image (its content was checked, not its name).",
        {"size_bytes": len(data), "declared_extension": extension},
    )
