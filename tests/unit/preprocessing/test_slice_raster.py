"""decode_raster on PNG/JPEG files written by Pillow: modes, bit depths, orientation, bombs, truncation."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile
from slice_inputs import encoded_image

from core.errors import ImageTooLarge, InvalidImageFormat
from preprocessing.raster import decode_raster

LIMIT = 64 * 2**20
EXIF_ORIENTATION = 0x0112
ROTATE_90_CLOCKWISE = 6


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny grey PNG whose IHDR announces width x height but whose pixel stream holds one row of zeros."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(bytes(width + 1)))
        + png_chunk(b"IEND", b"")
    )


@pytest.fixture
def noise() -> np.random.Generator:
    return np.random.default_rng(20240611)


def test_8_bit_grey_png_round_trips(noise: np.random.Generator) -> None:
    grey = noise.integers(0, 256, size=(17, 23), dtype=np.uint8)

    decoded = decode_raster(encoded_image(Image.fromarray(grey), "PNG"), max_pixels=LIMIT)

    np.testing.assert_array_equal(decoded.pixels, grey)
    assert decoded.pixels.dtype == np.float32 and decoded.shape == (17, 23)
    assert decoded.intensity == "display" and decoded.max_value == 255.0
    assert decoded.source.format == "png" and decoded.source.photometric == "L"
    assert decoded.pixel_spacing_mm is None and decoded.voi_window is None


def test_16_bit_grey_png_keeps_its_range(noise: np.random.Generator) -> None:
    grey = noise.integers(0, 65536, size=(9, 11), dtype=np.uint16)
    grey[0, 0], grey[0, 1] = 0, 65535

    decoded = decode_raster(encoded_image(Image.fromarray(grey), "PNG"), max_pixels=LIMIT)

    np.testing.assert_array_equal(decoded.pixels, grey)
    assert decoded.max_value == 65535.0 and decoded.source.photometric == "I;16"


def test_rgb_png_round_trips(noise: np.random.Generator) -> None:
    rgb = noise.integers(0, 256, size=(8, 5, 3), dtype=np.uint8)

    decoded = decode_raster(encoded_image(Image.fromarray(rgb), "PNG"), max_pixels=LIMIT)

    np.testing.assert_array_equal(decoded.pixels, rgb)
    assert decoded.max_value == 255.0


def test_rgba_png_drops_alpha(noise: np.random.Generator) -> None:
    rgba = noise.integers(0, 256, size=(6, 7, 4), dtype=np.uint8)

    decoded = decode_raster(encoded_image(Image.fromarray(rgba, mode="RGBA"), "PNG"), max_pixels=LIMIT)

    np.testing.assert_array_equal(decoded.pixels, rgba[..., :3])
    assert decoded.source.photometric == "RGBA"


def test_palette_png_becomes_rgb() -> None:
    palette_image = Image.new("P", (4, 2))
    palette_image.putpalette([10, 20, 30, 200, 100, 50] + [0, 0, 0] * 254)
    palette_image.putdata([0, 1, 1, 0, 1, 0, 0, 1])

    decoded = decode_raster(encoded_image(palette_image, "PNG"), max_pixels=LIMIT)

    assert decoded.pixels.shape == (2, 4, 3)
    np.testing.assert_array_equal(decoded.pixels[0, :2], [[10, 20, 30], [200, 100, 50]])


def test_grey_with_alpha_and_bilevel_become_grey() -> None:
    grey_alpha = Image.new("LA", (3, 2), (77, 5))
    bilevel = Image.new("1", (3, 2), 1)

    decoded_grey_alpha = decode_raster(encoded_image(grey_alpha, "PNG"), max_pixels=LIMIT)
    decoded_bilevel = decode_raster(encoded_image(bilevel, "PNG"), max_pixels=LIMIT)

    np.testing.assert_array_equal(decoded_grey_alpha.pixels, np.full((2, 3), 77.0))
    np.testing.assert_array_equal(decoded_bilevel.pixels, np.full((2, 3), 255.0))


def test_jpeg_grey_rgb_and_cmyk() -> None:
    grey = decode_raster(encoded_image(Image.new("L", (16, 8), 90), "JPEG"), max_pixels=LIMIT)
    rgb = decode_raster(encoded_image(Image.new("RGB", (16, 8), (200, 40, 10)), "JPEG", quality=95), max_pixels=LIMIT)
    cmyk = decode_raster(encoded_image(Image.new("CMYK", (16, 8), (0, 255, 255, 0)), "JPEG"), max_pixels=LIMIT)

    assert grey.source.format == "jpeg" and grey.pixels.shape == (8, 16)
    assert np.abs(grey.pixels - 90).max() <= 1
    assert np.abs(rgb.pixels - [200, 40, 10]).max() <= 4
    assert cmyk.pixels.shape == (8, 16, 3) and cmyk.source.photometric == "CMYK"
    assert cmyk.pixels[..., 0].mean() > 200 and cmyk.pixels[..., 1:].mean() < 60  # red


def test_jpeg_exif_orientation_is_applied() -> None:
    left_black_right_white = Image.new("L", (32, 16), 0)
    left_black_right_white.paste(255, (16, 0, 32, 16))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CLOCKWISE

    decoded = decode_raster(encoded_image(left_black_right_white, "JPEG", exif=exif), max_pixels=LIMIT)

    assert decoded.shape == (32, 16)
    assert decoded.pixels[:16].mean() < 20 and decoded.pixels[16:].mean() > 235  # the left edge is now on top


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_one_by_one_images(image_format: str) -> None:
    decoded = decode_raster(encoded_image(Image.new("L", (1, 1), 128), image_format), max_pixels=LIMIT)

    assert decoded.shape == (1, 1) and abs(decoded.pixels[0, 0] - 128) <= 1


def test_decompression_bomb_40000_squared_is_refused_without_decoding(monkeypatch) -> None:
    bomb = png_claiming_size(40000, 40000)
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: decoded.append(image.size) or load(image))

    with pytest.raises(ImageTooLarge) as refused:
        decode_raster(bomb, max_pixels=LIMIT)

    assert decoded == [] and len(bomb) < 200 and refused.value.status == 413  # refused from the header alone
    decode_raster(encoded_image(Image.new("L", (3, 2)), "PNG"), max_pixels=LIMIT)
    assert decoded and set(decoded) == {(3, 2)}  # the spy sees an ordinary image's pixels decoded


def test_header_over_the_limit_is_refused_before_decoding() -> None:
    # the pixel stream holds one row only: decoding would fail as truncated, so ImageTooLarge proves no decoding
    with pytest.raises(ImageTooLarge, match="5000 x 5000 pixels") as refused:
        decode_raster(png_claiming_size(5000, 5000), max_pixels=LIMIT // 4)

    assert refused.value.details["width"] == 5000 and refused.value.details["max_pixels"] == LIMIT // 4


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pillows_bomb_limit_applies_even_with_a_higher_configured_limit() -> None:
    with pytest.raises(ImageTooLarge):
        decode_raster(png_claiming_size(10000, 10000), max_pixels=10**9)


def test_pixel_limit_counts_samples() -> None:
    rgb = encoded_image(Image.new("RGB", (10, 10)), "PNG")

    assert decode_raster(rgb, max_pixels=300).shape == (10, 10)
    with pytest.raises(ImageTooLarge):
        decode_raster(rgb, max_pixels=299)


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_truncated_files_are_refused(image_format: str, noise: np.random.Generator) -> None:
    image = Image.fromarray(noise.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
    data = encoded_image(image, image_format)

    with pytest.raises(InvalidImageFormat, match="truncated or damaged") as refused:
        decode_raster(data[: len(data) // 2], max_pixels=LIMIT)

    assert refused.value.details["format"] == image_format.lower()
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_signature_without_an_image_is_refused() -> None:
    with pytest.raises(InvalidImageFormat, match="not a readable PNG or JPEG"):
        decode_raster(b"\x89PNG\r\n\x1a\nnot really", max_pixels=LIMIT)
