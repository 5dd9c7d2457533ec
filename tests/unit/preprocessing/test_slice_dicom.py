"""decode_dicom_slice on pydicom's bundled files: units, colour, frames, limits, refusals, no PHI."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array
from pydicom.sequence import Sequence
from pydicom.uid import UID
from slice_inputs import bundled_dataset, bundled_dicom, edited_dicom

from core.errors import ImageTooLarge, InvalidImageFormat
from core.imaging import DecodedSlice
from preprocessing import dicom as dicom_module
from preprocessing.dicom import decode_dicom_slice
from preprocessing.transforms import window_to_unit

LIMIT = 64 * 2**20
MR_TRANSFER_SYNTAX_VARIANTS = (
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_implicit.dcm",
    "MR_small_padded.dcm",
)


def decode(data: bytes, **options: object) -> DecodedSlice:
    return decode_dicom_slice(data, max_pixels=options.pop("max_pixels", LIMIT), **options)  # type: ignore[arg-type]


def test_ct_pixels_become_hounsfield_units_through_rescale_slope_and_intercept() -> None:
    dataset = bundled_dataset("CT_small.dcm")
    stored = dataset.pixel_array
    decoded = decode(bundled_dicom("CT_small.dcm"))

    slope, intercept = float(dataset.RescaleSlope), float(dataset.RescaleIntercept)
    assert intercept == -1024.0
    for row, column in [(0, 0), (64, 64), (127, 5), (30, 90), (100, 127)]:
        assert decoded.pixels[row, column] == stored[row, column] * slope + intercept
    assert decoded.intensity == "hounsfield"
    assert decoded.pixels.dtype == np.float32 and decoded.shape == (128, 128)
    assert decoded.pixel_spacing_mm == pytest.approx((0.661468, 0.661468))
    assert decoded.slice_thickness_mm == 5.0
    assert decoded.source.format == "dicom"
    assert decoded.source.modality == "CT"
    assert decoded.source.transfer_syntax == "Explicit VR Little Endian"
    assert decoded.source.photometric == "MONOCHROME2"
    assert decoded.source.series_uid == dataset.SeriesInstanceUID
    assert decoded.source.sop_instance_uid == dataset.SOPInstanceUID


@pytest.mark.parametrize("name", MR_TRANSFER_SYNTAX_VARIANTS)
def test_the_same_image_in_every_transfer_syntax_decodes_to_the_same_pixels(name: str) -> None:
    reference = decode(bundled_dicom("MR_small.dcm"))
    decoded = decode(bundled_dicom(name))

    np.testing.assert_array_equal(decoded.pixels, reference.pixels)
    assert decoded.source.transfer_syntax == bundled_dataset(name).file_meta.TransferSyntaxUID.name
    assert decoded.voi_window == reference.voi_window


def test_mr_is_raw_signed_16_bit_with_the_files_voi_window() -> None:
    decoded = decode(bundled_dicom("MR_small.dcm"))

    np.testing.assert_array_equal(decoded.pixels, bundled_dataset("MR_small.dcm").pixel_array)
    assert decoded.intensity == "raw"
    assert decoded.voi_window == (600.0, 1600.0)
    assert decoded.max_value == 32767.0
    assert decoded.slice_thickness_mm == 0.8


def test_unsigned_12_bit_image_keeps_its_stored_range() -> None:
    decoded = decode(bundled_dicom("JPGExtended.dcm"))

    assert decoded.intensity == "raw" and decoded.source.modality == "NM"
    assert decoded.max_value == 4095.0
    assert 0.0 <= decoded.pixels.min() and decoded.pixels.max() <= 4095.0


def test_first_of_several_voi_windows_is_used() -> None:
    assert decode(bundled_dicom("examples_overlay.dcm")).voi_window == (450.0, 790.0)


@pytest.mark.parametrize("width", ["0", "-5"])
def test_unusable_voi_window_is_dropped(width: str) -> None:
    def set_width(dataset: Dataset) -> None:
        dataset.WindowWidth = width

    assert decode(edited_dicom("MR_small.dcm", set_width)).voi_window is None


def as_monochrome1(dataset: Dataset) -> None:
    dataset.PhotometricInterpretation = "MONOCHROME1"


def test_monochrome1_is_inverted_so_that_its_display_is_the_negative_of_monochrome2() -> None:
    monochrome2 = decode(bundled_dicom("MR_small.dcm"))
    monochrome1 = decode(edited_dicom("MR_small.dcm", as_monochrome1))

    # signed 16-bit stored range [-32768, 32767]: inversion is low + high - value = -1 - value
    np.testing.assert_array_equal(monochrome1.pixels, -1.0 - monochrome2.pixels)
    assert monochrome1.voi_window == (-601.0, 1600.0)
    assert monochrome1.source.photometric == "MONOCHROME1"
    np.testing.assert_allclose(
        window_to_unit(monochrome1.pixels, *monochrome1.voi_window),
        1.0 - window_to_unit(monochrome2.pixels, *monochrome2.voi_window),
        atol=1e-5,
    )


def test_monochrome1_ct_keeps_physical_hounsfield_units() -> None:
    decoded = decode(edited_dicom("CT_small.dcm", as_monochrome1))

    np.testing.assert_array_equal(decoded.pixels, decode(bundled_dicom("CT_small.dcm")).pixels)
    assert decoded.intensity == "hounsfield"


@pytest.mark.parametrize(
    "name", ["SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_ybr_full_422_uncompressed.dcm"]
)
def test_ybr_images_are_converted_to_the_same_rgb_as_the_rgb_original(name: str) -> None:
    rgb = decode(bundled_dicom("SC_rgb_rle.dcm"))
    decoded = decode(bundled_dicom(name))

    assert decoded.source.photometric.startswith("YBR_FULL")
    assert decoded.shape == (100, 100) and decoded.pixels.shape == (100, 100, 3)
    assert decoded.intensity == "display" and decoded.max_value == 255.0
    np.testing.assert_array_equal(rgb.pixels[0, 0], [255.0, 0.0, 0.0])
    assert np.abs(decoded.pixels - rgb.pixels).mean() < 4.0  # lossy JPEG / chroma subsampling


def test_jpeg2000_reversible_colour_transform_becomes_rgb() -> None:
    decoded = decode(bundled_dicom("examples_jpeg2k.dcm"))

    assert decoded.source.photometric == "YBR_RCT"
    assert decoded.pixels.shape == (480, 640, 3)
    assert decoded.intensity == "display"


def test_16_bit_rgb_keeps_max_value_65535() -> None:
    decoded = decode(bundled_dicom("SC_rgb_rle_16bit.dcm"))

    assert decoded.max_value == 65535.0
    np.testing.assert_array_equal(decoded.pixels[0, 0], [65535.0, 0.0, 0.0])


def test_palette_colour_is_looked_up_in_the_files_colour_tables() -> None:
    dataset = bundled_dataset("examples_palette.dcm")
    decoded = decode(bundled_dicom("examples_palette.dcm"))

    entries, first_mapped, _bits = dataset.RedPaletteColorLookupTableDescriptor
    tables = [
        np.frombuffer(dataset[f"{colour}PaletteColorLookupTableData"].value, dtype="<u2")
        for colour in ("Red", "Green", "Blue")
    ]
    assert all(len(table) == entries for table in tables)
    stored = dataset.pixel_array
    for row, column in [(0, 0), (175, 400), (349, 799), (100, 300)]:
        index = int(stored[row, column]) - first_mapped
        assert decoded.pixels[row, column].tolist() == [float(table[index]) for table in tables]
    assert decoded.pixels.shape == (350, 800, 3)
    assert decoded.intensity == "display" and decoded.max_value == 65535.0


def test_palette_without_its_colour_table_is_refused() -> None:
    def drop_red_table(dataset: Dataset) -> None:
        del dataset.RedPaletteColorLookupTableData

    with pytest.raises(InvalidImageFormat, match="inconsistent and could not be applied") as refused:
        decode(edited_dicom("examples_palette.dcm", drop_red_table))

    assert refused.value.details["photometric"] == "PALETTE COLOR"


def test_multiframe_is_refused_unless_allowed() -> None:
    with pytest.raises(InvalidImageFormat, match="2 frames") as refused:
        decode(bundled_dicom("SC_rgb_rle_2frame.dcm"))

    assert refused.value.details["frames"] == 2


def test_allowed_multiframe_gives_the_middle_frame() -> None:
    two_frames = decode(bundled_dicom("SC_rgb_rle_2frame.dcm"), allow_multiframe=True)
    fifteen_frames = decode(bundled_dicom("rtdose.dcm"), allow_multiframe=True)

    np.testing.assert_array_equal(two_frames.pixels[0, 0], [0.0, 255.0, 255.0])  # frame 0 starts red, frame 1 cyan
    np.testing.assert_array_equal(fifteen_frames.pixels, bundled_dataset("rtdose.dcm").pixel_array[7])


def test_enhanced_functional_groups_give_spacing_thickness_and_rescale() -> None:
    segmentation = decode(bundled_dicom("liver_1frame.dcm"))

    def move_rescale_into_functional_groups(dataset: Dataset) -> None:
        transformation = Dataset()
        transformation.RescaleSlope, transformation.RescaleIntercept = dataset.RescaleSlope, dataset.RescaleIntercept
        shared = Dataset()
        shared.PixelValueTransformationSequence = Sequence([transformation])
        dataset.SharedFunctionalGroupsSequence = Sequence([shared])
        del dataset.RescaleSlope, dataset.RescaleIntercept

    enhanced_ct = decode(edited_dicom("CT_small.dcm", move_rescale_into_functional_groups))

    assert segmentation.pixel_spacing_mm == pytest.approx((0.810547, 0.810547))
    assert segmentation.slice_thickness_mm == 1.0
    np.testing.assert_array_equal(enhanced_ct.pixels, decode(bundled_dicom("CT_small.dcm")).pixels)


@pytest.mark.parametrize(
    ("name", "modality"), [("rtplan.dcm", "RTPLAN"), ("test-SR.dcm", "SR"), ("waveform_ecg.dcm", "ECG")]
)
def test_objects_without_an_image_are_refused(name: str, modality: str) -> None:
    with pytest.raises(InvalidImageFormat, match="holds no image") as refused:
        decode(bundled_dicom(name))

    assert refused.value.details["modality"] == modality


def test_truncated_pixel_data_is_refused_with_the_reason() -> None:
    with pytest.raises(InvalidImageFormat, match="could not be decoded") as refused:
        decode(bundled_dicom("MR_truncated.dcm"))

    assert "less than expected" in refused.value.details["reason"]
    assert refused.value.details["transfer_syntax"] == "Explicit VR Little Endian"


def test_damaged_header_is_refused() -> None:
    unknown_vr = b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00XI\x02\x00ab"

    with pytest.raises(InvalidImageFormat, match="truncated or damaged") as refused:
        decode(unknown_vr)

    assert refused.value.details == {"format": "dicom", "reason": "NotImplementedError"}


def test_invalid_number_of_frames_is_refused() -> None:
    with pytest.raises(InvalidImageFormat, match="NumberOfFrames"):
        decode(bundled_dicom("badVR.dcm"), allow_multiframe=True)


def test_modality_outside_the_accepted_ones_is_refused_in_plain_words() -> None:
    with pytest.raises(InvalidImageFormat, match="accepts CT DICOM images; the file's modality is MR") as refused:
        decode(bundled_dicom("MR_small.dcm"), modalities=["CT"])

    assert refused.value.details["accepted_modalities"] == ["CT"]
    assert decode(bundled_dicom("CT_small.dcm"), modalities=["ct", "MR"]).source.modality == "CT"


def test_missing_modality_is_refused_when_modalities_are_restricted() -> None:
    with pytest.raises(InvalidImageFormat, match="modality is missing"):
        decode(bundled_dicom("JPEGLSNearLossless_08.dcm"), modalities=["CT"])


def test_pixel_limit_counts_rows_columns_frames_and_samples() -> None:
    assert decode(bundled_dicom("CT_small.dcm"), max_pixels=128 * 128).shape == (128, 128)
    assert decode(bundled_dicom("SC_rgb_small_odd.dcm"), max_pixels=3 * 3 * 3).shape == (3, 3)

    with pytest.raises(ImageTooLarge) as refused:
        decode(bundled_dicom("CT_small.dcm"), max_pixels=128 * 128 - 1)
    with pytest.raises(ImageTooLarge):
        decode(bundled_dicom("SC_rgb_small_odd.dcm"), max_pixels=3 * 3 * 3 - 1)

    assert refused.value.status == 413
    assert refused.value.details["rows"] == 128 and refused.value.details["values"] == 128 * 128


def test_header_bomb_is_refused_from_the_header_alone(monkeypatch) -> None:
    def claim_huge_size(dataset: Dataset) -> None:
        dataset.Rows = dataset.Columns = 65535
        dataset.NumberOfFrames = 100000

    bomb = edited_dicom("CT_small.dcm", claim_huge_size)
    decoded = []
    monkeypatch.setattr(dicom_module, "pixel_array", lambda *args, **kwargs: decoded.append(args) or pixel_array(
        *args, **kwargs))

    with pytest.raises(ImageTooLarge, match="65535 x 65535 pixels x 100000 frame"):
        decode(bomb, allow_multiframe=True)

    assert decoded == []  # no pixel decoding was attempted
    decode(bundled_dicom("CT_small.dcm"))
    assert len(decoded) == 1  # the spy sees the decoder's one call for an ordinary file


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.4.100", "1.2.3.4.5.6"])
def test_undecodable_transfer_syntax_is_named(syntax: str) -> None:
    def relabel(dataset: Dataset) -> None:
        dataset.file_meta.TransferSyntaxUID = UID(syntax)

    data = edited_dicom("MR_small_RLE.dcm", relabel)

    with pytest.raises(InvalidImageFormat, match="cannot be decoded by this service") as refused:
        decode(data)

    assert UID(syntax).name in refused.value.message
    assert refused.value.details["transfer_syntax_uid"] == syntax


def test_unsupported_photometric_interpretation_is_refused() -> None:
    def grey_labelled_colour(dataset: Dataset) -> None:
        dataset.PhotometricInterpretation = "YBR_FULL"

    with pytest.raises(InvalidImageFormat, match="YBR_FULL with 1 sample"):
        decode(edited_dicom("MR_small.dcm", grey_labelled_colour))


def test_one_by_one_image() -> None:
    def single_pixel(dataset: Dataset) -> None:
        dataset.Rows = dataset.Columns = 1
        dataset.PixelData = np.array([-7], dtype="<i2").tobytes()

    decoded = decode(edited_dicom("MR_small.dcm", single_pixel))

    assert decoded.shape == (1, 1) and decoded.pixels[0, 0] == -7.0


def test_no_patient_identifiers_in_results_or_errors() -> None:
    dataset = bundled_dataset("CT_small.dcm")
    identifiers = [str(dataset.PatientName), str(dataset.PatientID), "CompressedSamples"]
    decoded = decode(bundled_dicom("CT_small.dcm"))
    errors = []
    for options in ({"modalities": ["MR"]}, {"max_pixels": 10}):
        with pytest.raises((InvalidImageFormat, ImageTooLarge)) as refused:
            decode(bundled_dicom("CT_small.dcm"), **options)
        errors.append(refused.value)
    with pytest.raises(InvalidImageFormat) as truncated:
        decode(bundled_dicom("MR_truncated.dcm"))
    errors.append(truncated.value)

    metadata = {field.name: getattr(decoded, field.name) for field in dataclasses.fields(decoded)}
    del metadata["pixels"]
    texts = [repr(metadata)] + [f"{error.message} {error.details!r}" for error in errors]
    assert not [identifier for identifier in identifiers for text in texts if identifier in text]


def test_pixels_match_pydicoms_own_decoding_for_compressed_ct() -> None:
    decoded = decode(bundled_dicom("693_J2KI.dcm"))
    dataset = bundled_dataset("693_J2KI.dcm")

    expected = pixel_array(dataset) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    np.testing.assert_array_equal(decoded.pixels, expected)
    assert decoded.source.transfer_syntax == "JPEG 2000 Image Compression"


def test_quiet_pydicom_silences_value_quoting_logs():
    import logging

    import pydicom.config

    from preprocessing.dicom import quiet_pydicom

    quiet_pydicom()
    assert pydicom.config.settings.reading_validation_mode == pydicom.config.IGNORE
    assert logging.getLogger("pydicom").level == logging.ERROR
