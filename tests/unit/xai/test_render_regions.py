"""Heatmap rendering in the input's geometry, overlays, PNG data URLs and important regions."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from xai.regions import important_regions
from xai.render import colorize, overlay, png_data_url, to_source_geometry


def decode_data_url(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_png_data_url_round_trips_grey_and_rgb():
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert np.array_equal(np.asarray(decode_data_url(png_data_url(grey))), grey)
    rgb = np.zeros((5, 7, 3), np.uint8)
    assert decode_data_url(png_data_url(rgb)).size == (7, 5)


def test_to_source_geometry_resizes_to_rows_columns():
    heatmap = np.zeros((224, 224), np.float32)
    heatmap[:, 112:] = 1.0
    out = to_source_geometry(heatmap, (100, 300))
    assert out.shape == (100, 300) and out.min() >= 0 and out.max() <= 1
    assert out[:, :140].max() < 0.05 and out[:, 160:].min() > 0.95
    np.testing.assert_array_equal(to_source_geometry(heatmap, (224, 224)), heatmap)  # same geometry: unchanged


def test_colorize_and_overlay():
    heatmap = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    coloured = colorize(heatmap)
    assert coloured.shape == (10, 10, 3) and coloured.dtype == np.uint8
    assert coloured[0, 0, 2] > coloured[0, 0, 0] and coloured[-1, -1, 0] > coloured[-1, -1, 2]  # jet: blue -> red
    blended = overlay(np.zeros((10, 10), np.float32), heatmap, alpha=0.4)
    assert np.allclose(blended, (0.4 * coloured).astype(np.uint8), atol=1)
    with pytest.raises(ValueError, match="colour map"):
        colorize(heatmap, "no-such-map")


def test_important_regions_threshold_area_and_order():
    heatmap = np.zeros((200, 200), np.float32)
    heatmap[10:30, 10:20] = 0.9      # 200 px
    heatmap[100:150, 50:100] = 0.75  # 2500 px
    heatmap[0:5, 190:195] = 1.0      # 25 px: below the minimum area
    heatmap[180:190, 0:10] = 0.5     # below the threshold
    regions = important_regions(heatmap)
    assert [(r.x, r.y, r.width, r.height) for r in regions] == [(50, 100, 50, 50), (10, 10, 10, 20)]
    assert regions[0].importance == pytest.approx(0.75) and regions[1].importance == pytest.approx(0.9)
    assert important_regions(np.zeros((50, 50), np.float32)) == []
