"""One PNG or JPEG image -> DecodedSlice through Pillow, its size checked from the header before decoding.

`max_pixels` bounds the decoded sample values (width x height x bands), as for DICOM; Pillow's own
decompression-bomb limit (Image.MAX_IMAGE_PIXELS, on width x height) is honoured as well.
Truncated files are refused: Pillow's ImageFile.LOAD_TRUNCATED_IMAGES must stay off (its default).
"""

from __future__ import annotations

from io import BytesIO
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

from core.errors import ImageTooLarge, InvalidImageFormat
from core.imaging import DecodedSlice, ImageSource

_FORMATS = ("PNG", "JPEG")
_SIXTEEN_BIT_GREY = "I;16"
_EIGHT_BIT_GREY = frozenset({"1", "L", "LA"})
_SIXTEEN_BIT_MAX = 65535.0
_EIGHT_BIT_MAX = 255.0


def decode_raster(data: bytes, *, max_pixels: int) -> DecodedSlice:
    """Decode a PNG or JPEG (EXIF orientation applied) to grey (H, W) or RGB (H, W, 3), intensity 'display'.

    Alpha is dropped, palettes become RGB, 16-bit grey keeps max_value 65535.
    Raises ImageTooLarge for images over the limit and InvalidImageFormat for anything undecodable.
    """
    try:
        image = Image.open(BytesIO(data), formats=_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"The image is larger than the decoder allows: {exc}", {"max_pixels": max_pixels}) from exc
    except Exception as exc:
        raise InvalidImageFormat(
            "The file is not a readable PNG or JPEG image.", {"reason": type(exc).__name__}
        ) from exc
    image_format: Literal["png", "jpeg"] = "png" if image.format == "PNG" else "jpeg"
    details: dict[str, Any] = {"format": image_format, "width": image.width, "height": image.height, "mode": image.mode}
    _check_size(image, max_pixels, details)
    try:
        pixels, max_value = _to_array(ImageOps.exif_transpose(image))
    except Exception as exc:
        raise InvalidImageFormat(
            f"The {image_format.upper()} image data could not be decoded; the file may be truncated or damaged.",
            {**details, "reason": str(exc)},
        ) from exc
    source = ImageSource(format=image_format, photometric=image.mode)
    return DecodedSlice(pixels=pixels, intensity="display", source=source, max_value=max_value)


def _check_size(image: Image.Image, max_pixels: int, details: dict[str, Any]) -> None:
    """Refuse decompression bombs from the header alone, before any pixel is decoded."""
    area = image.width * image.height
    values = area * len(image.getbands())
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if values > max_pixels or (pillow_limit is not None and area > pillow_limit):
        raise ImageTooLarge(
            f"The image is {image.width} x {image.height} pixels ({values} values), more than the limit of "
            f"{max_pixels}.",
            {**details, "values": values, "max_pixels": max_pixels},
        )


def _to_array(image: Image.Image) -> tuple[np.ndarray, float]:
    """Pixels as float32 grey or RGB, and the largest value their bit depth allows."""
    if image.mode == _SIXTEEN_BIT_GREY:
        return np.asarray(image, dtype=np.float32), _SIXTEEN_BIT_MAX
    mode = "L" if image.mode in _EIGHT_BIT_GREY else "RGB"
    return np.asarray(image.convert(mode), dtype=np.float32), _EIGHT_BIT_MAX
