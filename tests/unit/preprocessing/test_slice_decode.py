"""decode_slice: format sniffed from content (never the name), dispatch, and only typed errors for any bytes."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom import dcmwrite
from pydicom.dataset import FileMetaDataset
from slice_inputs import bundled_dataset, bundled_dicom, encoded_image

from core.errors import ImageTooLarge, InvalidImageFormat
from core.imaging import DecodedSlice
from preprocessing.decode import decode_slice, sniff_format

LIMIT = 64 * 2**20
PNG = encoded_image(Image.new("L", (5, 4), 42), "PNG")
JPEG = encoded_image(Image.new("RGB", (5, 4), (0, 128, 255)), "JPEG")
SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\0" * 128 + b"DICM", b"")
REAL_FILES = (PNG, JPEG, bundled_dicom("CT_small.dcm"), bundled_dicom("MR_small_RLE.dcm"))


def headerless(name: str, *, implicit_vr: bool) -> bytes:
    """A bundled image written as a bare dataset: no preamble, no 'DICM', no file meta (no transfer syntax)."""
    dataset = bundled_dataset(name)
    dataset.file_meta = FileMetaDataset()
    dataset.preamble = None
    buffer = BytesIO()
    dcmwrite(buffer, dataset, implicit_vr=implicit_vr, little_endian=True)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (bundled_dicom("CT_small.dcm"), "dicom"),
        (headerless("MR_small.dcm", implicit_vr=True), "dicom"),
        (PNG, "png"),
        (JPEG, "jpeg"),
        (bundled_dicom("rtstruct.dcm"), None),  # headerless, but no pixel data: not taken for an image
        (b"just some text\n", None),
        (b"\x08\x00\x05\x00XI\x02\x00ab", None),  # read as a DICOM element with an unknown VR: pydicom raises
    ],
)
def test_sniff_format_reads_the_content(data: bytes, expected: str | None) -> None:
    assert sniff_format(data) == expected


def test_the_filename_never_decides_the_format() -> None:
    assert decode_slice(PNG, "scan.dcm", max_pixels=LIMIT).source.format == "png"
    assert decode_slice(JPEG, "scan.png", max_pixels=LIMIT).source.format == "jpeg"
    assert decode_slice(bundled_dicom("CT_small.dcm"), "photo.jpg", max_pixels=LIMIT).source.format == "dicom"


def test_empty_upload_is_refused() -> None:
    with pytest.raises(InvalidImageFormat, match="empty"):
        decode_slice(b"", "scan.png", max_pixels=LIMIT)


def test_text_named_png_is_refused_with_its_declared_extension_only() -> None:
    with pytest.raises(InvalidImageFormat, match="not a DICOM, PNG or JPEG") as refused:
        decode_slice(b"<html>not an image</html>", "Doe_John_scan.PNG", max_pixels=LIMIT)

    assert refused.value.details == {"size_bytes": 25, "declared_extension": ".png"}
    assert "Doe" not in refused.value.message


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_headerless_dicom_decodes_with_its_transfer_syntax_inferred(implicit_vr: bool) -> None:
    decoded = decode_slice(headerless("MR_small.dcm", implicit_vr=implicit_vr), max_pixels=LIMIT)

    np.testing.assert_array_equal(decoded.pixels, bundled_dataset("MR_small.dcm").pixel_array)
    expected = "Implicit VR Little Endian" if implicit_vr else "Explicit VR Little Endian"
    assert decoded.source.transfer_syntax == expected


def test_dicom_options_are_passed_through() -> None:
    with pytest.raises(InvalidImageFormat, match="modality is CT"):
        decode_slice(bundled_dicom("CT_small.dcm"), max_pixels=LIMIT, modalities=["MR"])
    with pytest.raises(InvalidImageFormat, match="frames"):
        decode_slice(bundled_dicom("SC_rgb_rle_2frame.dcm"), max_pixels=LIMIT)
    with pytest.raises(ImageTooLarge):
        decode_slice(bundled_dicom("CT_small.dcm"), max_pixels=100)

    assert decode_slice(bundled_dicom("SC_rgb_rle_2frame.dcm"), max_pixels=LIMIT, allow_multiframe=True).shape == (
        100,
        100,
    )


def test_png_and_jpeg_have_no_modality_to_restrict() -> None:
    assert decode_slice(PNG, max_pixels=LIMIT, modalities=["CT"]).source.modality is None


def test_raster_limit_is_passed_through() -> None:
    with pytest.raises(ImageTooLarge):
        decode_slice(PNG, max_pixels=19)


def spliced(original: bytes, position: int, junk: bytes, cut: int) -> bytes:
    """A real file with junk written over it at some position, then cut short."""
    position %= len(original)
    return (original[:position] + junk + original[position + len(junk) :])[: max(cut, 1)]


ARBITRARY_UPLOADS = st.one_of(
    st.binary(max_size=1024),
    st.builds(lambda prefix, tail: prefix + tail, st.sampled_from(SIGNATURES), st.binary(max_size=1024)),
    st.builds(
        spliced,
        st.sampled_from(REAL_FILES),
        st.integers(min_value=0),
        st.binary(min_size=1, max_size=16),
        st.integers(min_value=1, max_value=50_000),
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=ARBITRARY_UPLOADS)
def test_any_bytes_give_a_slice_or_a_typed_error(data: bytes) -> None:
    try:
        decoded = decode_slice(data, "upload.bin", max_pixels=LIMIT, allow_multiframe=True)
    except (InvalidImageFormat, ImageTooLarge) as error:
        assert error.message
        return
    assert isinstance(decoded, DecodedSlice)
    assert decoded.pixels.ndim in (2, 3) and decoded.pixels.dtype == np.float32
