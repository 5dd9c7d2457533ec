"""prepare_slice and its steps, fed with slices decoded from real files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from slice_inputs import bundled_dicom, encoded_image

from core.cards.classification import ImageInputSpec, Window
from core.imaging import DecodedSlice
from preprocessing.decode import decode_slice
from preprocessing.transforms import prepare_slice, resize, to_channels, to_unit_range, window_to_unit

LIMIT = 64 * 2**20
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def decoded_dicom(name: str) -> DecodedSlice:
    return decode_slice(bundled_dicom(name), max_pixels=LIMIT)


def test_ct_is_clipped_and_windowed_in_hounsfield_units() -> None:
    ct = decoded_dicom("CT_small.dcm")
    spec = ImageInputSpec(channels=3, ct_window=Window(center=40, width=80), hu_clip=(-100.0, 300.0))

    prepared = prepare_slice(ct, spec)

    expected = np.clip(np.clip(ct.pixels, -100, 300) / 80.0, 0.0, 1.0)  # window [0, 80] HU
    np.testing.assert_allclose(prepared.display, expected, atol=1e-6)
    assert prepared.display.shape == ct.shape == (128, 128)
    assert prepared.tensor.shape == (3, 224, 224) and prepared.tensor.dtype == np.float32
    np.testing.assert_array_equal(prepared.tensor[0], prepared.tensor[2])


def test_mr_uses_the_files_voi_window() -> None:
    mr = decoded_dicom("MR_small.dcm")

    unit = to_unit_range(mr, ImageInputSpec())

    np.testing.assert_allclose(unit, np.clip((mr.pixels - (600 - 800)) / 1600, 0, 1), atol=1e-6)


def test_raw_without_window_is_stretched_between_percentiles() -> None:
    image = decoded_dicom("JPEGLSNearLossless_16.dcm")
    assert image.intensity == "raw" and image.voi_window is None

    unit = to_unit_range(image, ImageInputSpec())

    low, high = np.percentile(image.pixels, (0.5, 99.5))
    assert unit.min() == 0.0 and unit.max() == 1.0
    np.testing.assert_allclose(unit, window_to_unit(image.pixels, (low + high) / 2, high - low), atol=1e-6)


def test_display_images_are_divided_by_their_max_value() -> None:
    grey16 = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    image = decode_slice(encoded_image(Image.fromarray(grey16), "PNG"), max_pixels=LIMIT)

    np.testing.assert_allclose(to_unit_range(image, ImageInputSpec()), grey16 / 65535.0, atol=1e-6)


def test_rgb_becomes_luminance_for_one_channel_models() -> None:
    rgb = decoded_dicom("examples_rgb_color.dcm")
    unit = to_unit_range(rgb, ImageInputSpec())

    one_channel = to_channels(unit, 1)
    prepared = prepare_slice(rgb, ImageInputSpec(channels=3, height=32, width=48))

    assert one_channel.shape == (1, 240, 320)
    np.testing.assert_allclose(one_channel[0], unit @ LUMA, atol=1e-6)
    assert prepared.tensor.shape == (3, 32, 48)
    np.testing.assert_allclose(prepared.display, unit @ LUMA, atol=1e-6)


@pytest.mark.parametrize(
    ("spec", "low", "high"),
    [
        (ImageInputSpec(scaling="unit"), 0.0, 1.0),
        (ImageInputSpec(scaling="symmetric"), -1.0, 1.0),
        (ImageInputSpec(scaling="mean_std", mean=[0.5], std=[0.25]), -2.0, 2.0),
    ],
)
def test_scaling_maps_the_unit_range(spec: ImageInputSpec, low: float, high: float) -> None:
    tensor = prepare_slice(decoded_dicom("CT_small.dcm"), spec).tensor

    assert tensor.min() == pytest.approx(low) and tensor.max() == pytest.approx(high)


def test_nhwc_layout_puts_channels_last() -> None:
    spec = ImageInputSpec(channels=3, layout="NHWC", height=16, width=16)

    assert prepare_slice(decoded_dicom("CT_small.dcm"), spec).tensor.shape == (16, 16, 3)


def test_resize_keeps_matching_sizes_and_uses_the_cards_filter() -> None:
    checker = np.array([[[0.0, 1.0], [1.0, 0.0]]], dtype=np.float32)

    same = resize(checker, ImageInputSpec(height=8, width=8).model_copy(update={"height": 2, "width": 2}))
    nearest = resize(checker, ImageInputSpec(height=8, width=8, resize_filter="nearest"))

    assert same is checker
    np.testing.assert_array_equal(nearest[0], np.kron(checker[0], np.ones((4, 4))))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest", "area"])
@pytest.mark.parametrize(("source", "target"), [((512, 384), (224, 224)), ((100, 37), (224, 160)), ((9, 300), (8, 301))])
def test_resize_matches_torch_interpolate(mode: str, source: tuple[int, int], target: tuple[int, int]) -> None:
    """The numpy resize reproduces what the models were trained on: torch's interpolate as MONAI's Resize called it
    (align_corners=False, no anti-aliasing), down and up, for every filter a card may name."""
    torch = pytest.importorskip("torch")
    chw = np.random.default_rng(0).random((3, *source), dtype=np.float32)
    spec = ImageInputSpec(height=target[0], width=target[1], resize_filter=mode)

    ours = resize(chw, spec)

    options = {} if mode in ("nearest", "area") else {"align_corners": False}
    expected = torch.nn.functional.interpolate(torch.from_numpy(chw)[None], size=target, mode=mode, **options)[0].numpy()
    assert ours.shape == (3, *target) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=2e-5)
