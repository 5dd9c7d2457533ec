"""One DICOM slice -> DecodedSlice through pydicom, every limit checked on the header before pixels are decoded.

`max_pixels` bounds the decoded sample values: Rows x Columns x frames x Samples per Pixel.
Every parse is bounded (`read_dicom`): pydicom reads at most `MAX_TOP_LEVEL_ELEMENTS` top-level elements.
Nothing patient-identifying (names, birth dates, ids) goes into a result, an error message or its details.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from io import BytesIO
from typing import Any

import numpy as np
import pydicom.config
from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_rescale, get_decoder, pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from core.errors import ImageTooLarge, InvalidImageFormat
from core.imaging import DecodedSlice, ImageSource, IntensityKind

_PREFIX_OFFSET = 128
_PREFIX = b"DICM"
_IMAGE_KEYWORDS = ("PixelData", "Rows", "Columns", "BitsAllocated", "PhotometricInterpretation")
_GREY = frozenset({"MONOCHROME1", "MONOCHROME2"})
_DECODED_AS_RGB = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
_PALETTE = "PALETTE COLOR"
_NATIVE_SYNTAX_BY_ENCODING = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}
_FRAME_KEYWORDS = ("PixelSpacing", "SliceThickness", "RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth")
_FRAME_GROUP_SEQUENCES = ("PixelMeasuresSequence", "PixelValueTransformationSequence", "FrameVOILUTSequence")
_REASON_CHARS = 300
MAX_TOP_LEVEL_ELEMENTS = 5000
"""Far above any real image header (a few hundred top-level elements); garbage parses as millions of tiny ones."""
_FIRST_GROUPS = (0x0002, 0x0008)
_MAX_META_ELEMENTS = 64
_LONG_LENGTH_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


def has_dicom_prefix(data: bytes) -> bool:
    """True for the DICOM file format: a 128-byte preamble followed by 'DICM'."""
    return data[_PREFIX_OFFSET : _PREFIX_OFFSET + len(_PREFIX)] == _PREFIX


def could_be_dicom(head: bytes) -> bool:
    """Whether a file starting with `head` (at least 136 bytes of it) can be DICOM: the preamble and 'DICM', or a
    first element in group 0002 (file meta) or 0008 (every image IOD's first module), little or big endian."""
    if has_dicom_prefix(head):
        return True
    return len(head) >= 4 and any(int.from_bytes(head[:2], order) in _FIRST_GROUPS for order in ("little", "big"))


def _bounded_read() -> Callable[[BaseTag, str | None, int], bool]:
    """A pydicom `stop_when`: stop at a top-level tag below the one before or seen a third time (a dataset is sorted
    by tag; pydicom asks twice about the first element; garbage such as a run of zeros repeats one tag) or past
    `MAX_TOP_LEVEL_ELEMENTS`, so no input makes the dataset read slow."""
    seen = {"last": -1, "repeats": 0, "count": 0}

    def stop(tag: BaseTag, vr: str | None, length: int) -> bool:
        seen["count"] += 1
        seen["repeats"] = seen["repeats"] + 1 if int(tag) == seen["last"] else 0
        if int(tag) < seen["last"] or seen["repeats"] > 1 or seen["count"] > MAX_TOP_LEVEL_ELEMENTS:
            return True
        seen["last"] = int(tag)
        return False

    return stop


def _first_dataset_group(data: bytes) -> int | None:
    """The group of the first element after the preamble and the file meta group (explicit VR little endian, as the
    standard fixes it); None past `_MAX_META_ELEMENTS` meta elements; -1 when the bytes end first."""
    offset = _PREFIX_OFFSET + len(_PREFIX) if has_dicom_prefix(data) else 0
    for _ in range(_MAX_META_ELEMENTS):
        if len(data) < offset + 8:
            return -1
        group = int.from_bytes(data[offset:offset + 2], "little")
        if group != 0x0002:
            return group
        if data[offset + 4:offset + 6] in _LONG_LENGTH_VRS:
            offset += 12 + int.from_bytes(data[offset + 8:offset + 12], "little")
        else:
            offset += 8 + int.from_bytes(data[offset + 6:offset + 8], "little")
    return None


def read_dicom(data: bytes, *, defer_size: int | None = None) -> Dataset:
    """`dcmread(force=True)` with the bounded read above; a stopped read yields the elements before the stop.

    ValueError when the dataset starts with a command set (group 0000, never part of a stored file), which pydicom
    would read without any bound, or the file meta group is implausibly long.
    """
    if _first_dataset_group(data) in (0x0000, None):
        raise ValueError("the dataset starts with a command set (group 0000) or an endless file meta group")
    return read_partial(BytesIO(data), stop_when=_bounded_read(), defer_size=defer_size, force=True)


def is_headerless_dicom_image(data: bytes) -> bool:
    """True if pydicom reads the bytes (forced, no preamble needed) as a dataset with pixel data and image tags."""
    try:
        dataset = read_dicom(data, defer_size=1024)
    except Exception:
        return False
    return _is_image(dataset)


def decode_dicom_slice(
    data: bytes, *, max_pixels: int, allow_multiframe: bool = False, modalities: Sequence[str] | None = None
) -> DecodedSlice:
    """Decode one DICOM image: CT to Hounsfield units, other grey images raw with their VOI window, colour to RGB.

    Multi-frame objects are refused unless `allow_multiframe`, which takes the middle frame.
    Raises InvalidImageFormat for anything that is not a decodable image of an accepted modality, and
    ImageTooLarge when the header announces more than `max_pixels` samples.
    """
    dataset = _read_dataset(data)
    details: dict[str, Any] = {"format": "dicom"}
    try:
        return _decode_dataset(dataset, details, max_pixels, allow_multiframe, modalities)
    except (InvalidImageFormat, ImageTooLarge):
        raise
    except Exception as exc:
        raise InvalidImageFormat(
            "The DICOM image tags (bit depth, rescale, palette, geometry) are inconsistent and could not be applied.",
            {**details, "reason": str(exc)[:_REASON_CHARS]},
        ) from exc


def _decode_dataset(
    dataset: Dataset,
    details: dict[str, Any],
    max_pixels: int,
    allow_multiframe: bool,
    modalities: Sequence[str] | None,
) -> DecodedSlice:
    """Header checks in order of cost, then one frame's pixels decoded and interpreted; fills `details` as it goes."""
    details["modality"] = _text(dataset, "Modality")
    if not _is_image(dataset):
        sop_class = UID(str(dataset.get("SOPClassUID") or "")).name or None
        raise InvalidImageFormat(
            f"The DICOM file holds no image: it is a {sop_class or 'DICOM object'} (modality "
            f"{details['modality'] or 'unknown'}) without pixel data or image tags. Send a single image slice.",
            {**details, "sop_class": sop_class},
        )
    _check_modality(details["modality"], modalities, details)
    frames = _check_size(dataset, max_pixels, details)
    if frames > 1 and not allow_multiframe:
        raise InvalidImageFormat(
            f"The DICOM file holds {frames} frames; this endpoint takes a single slice, so send one frame per file.",
            details,
        )
    photometric = _check_photometric(dataset, details)
    syntax = _check_transfer_syntax(dataset, details)
    index = frames // 2
    stored = _decode_pixels(dataset, index if frames > 1 else None, details)
    source = ImageSource(
        format="dicom",
        modality=details["modality"],
        transfer_syntax=syntax.name,
        photometric=photometric,
        series_uid=_text(dataset, "SeriesInstanceUID"),
        sop_instance_uid=_text(dataset, "SOPInstanceUID"),
    )
    return _interpret(dataset, _frame_header(dataset, index), stored, source)


def _read_dataset(data: bytes) -> Dataset:
    """Parse the whole dataset; pydicom's own message is not echoed because it may quote element values (PHI)."""
    try:
        return read_dicom(data)
    except Exception as exc:
        raise InvalidImageFormat(
            "The file could not be read as DICOM: its header is truncated or damaged.",
            {"format": "dicom", "reason": type(exc).__name__},
        ) from exc


def _is_image(dataset: Dataset) -> bool:
    return all(keyword in dataset for keyword in _IMAGE_KEYWORDS)


def _text(dataset: Dataset, keyword: str) -> str | None:
    value = dataset.get(keyword)
    if value is None:
        return None
    return str(value).strip() or None


def _header_int(dataset: Dataset, keyword: str, default: int, details: dict[str, Any]) -> int:
    """A positive integer header value (pydicom keeps invalid IS strings as they are, so check here)."""
    value = dataset.get(keyword)
    try:
        number = default if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise InvalidImageFormat(f"The DICOM header has an invalid {keyword} value.", {**details, "tag": keyword})
    return number


def _check_modality(modality: str | None, modalities: Sequence[str] | None, details: dict[str, Any]) -> None:
    if modalities is None:
        return
    accepted = sorted({name.upper() for name in modalities})
    if (modality or "").upper() not in accepted:
        raise InvalidImageFormat(
            f"This endpoint accepts {' or '.join(accepted)} DICOM images; the file's modality is "
            f"{modality or 'missing'}.",
            {**details, "accepted_modalities": accepted},
        )


def _check_size(dataset: Dataset, max_pixels: int, details: dict[str, Any]) -> int:
    """Refuse header bombs from the header alone; returns the number of frames."""
    rows = _header_int(dataset, "Rows", 0, details)
    columns = _header_int(dataset, "Columns", 0, details)
    frames = _header_int(dataset, "NumberOfFrames", 1, details)
    samples = _header_int(dataset, "SamplesPerPixel", 1, details)
    details.update(rows=rows, columns=columns, frames=frames, samples_per_pixel=samples)
    total = rows * columns * frames * samples
    if total > max_pixels:
        raise ImageTooLarge(
            f"The DICOM image is {rows} x {columns} pixels x {frames} frame(s) x {samples} sample(s) = {total} values, "
            f"more than the limit of {max_pixels}.",
            {**details, "values": total, "max_pixels": max_pixels},
        )
    return frames


def _check_photometric(dataset: Dataset, details: dict[str, Any]) -> str:
    photometric = _text(dataset, "PhotometricInterpretation") or ""
    details["photometric"] = photometric
    samples = details["samples_per_pixel"]
    grey_like = photometric in _GREY or photometric == _PALETTE
    if (samples == 1 and grey_like) or (samples == 3 and photometric in _DECODED_AS_RGB):
        return photometric
    raise InvalidImageFormat(
        f"The DICOM photometric interpretation {photometric or '(missing)'} with {samples} sample(s) per pixel is "
        "not supported; send MONOCHROME1/2, PALETTE COLOR, RGB or YBR_FULL images.",
        details,
    )


def _check_transfer_syntax(dataset: Dataset, details: dict[str, Any]) -> UID:
    """The file's transfer syntax (inferred from the encoding for files without meta) and a decoder for it."""
    file_meta = dataset.file_meta
    inferred = _NATIVE_SYNTAX_BY_ENCODING.get(dataset.original_encoding)
    if "TransferSyntaxUID" not in file_meta and inferred and not dataset["PixelData"].is_undefined_length:
        file_meta.TransferSyntaxUID = inferred
    syntax = UID(str(file_meta.get("TransferSyntaxUID") or ""))
    details.update(transfer_syntax=syntax.name, transfer_syntax_uid=str(syntax))
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise InvalidImageFormat(
            f"The DICOM transfer syntax '{syntax.name or 'unknown'}' cannot be decoded by this service; send the image "
            "uncompressed or as JPEG, JPEG-LS, JPEG 2000 or RLE.",
            details,
        )
    return syntax


def _decode_pixels(dataset: Dataset, index: int | None, details: dict[str, Any]) -> np.ndarray:
    try:
        return pixel_array(dataset, index=index)
    except Exception as exc:
        raise InvalidImageFormat(
            f"The DICOM pixel data could not be decoded ({details['transfer_syntax']}); the file may be truncated "
            "or its image tags inconsistent.",
            {**details, "reason": str(exc)[:_REASON_CHARS]},
        ) from exc


def _frame_header(dataset: Dataset, index: int) -> Dataset:
    """The tags describing one frame: top level, overridden by enhanced multi-frame functional groups."""
    header = Dataset()
    sources: list[Dataset] = [dataset]
    for sequence, position in (("SharedFunctionalGroupsSequence", 0), ("PerFrameFunctionalGroupsSequence", index)):
        groups = dataset.get(sequence) or []
        if position < len(groups):
            group = groups[position]
            sources += [group[keyword][0] for keyword in _FRAME_GROUP_SEQUENCES if group.get(keyword)]
    for source in sources:
        for keyword in _FRAME_KEYWORDS:
            if source.get(keyword) is not None:
                header[keyword] = source[keyword]
    return header


def _stored_range(dataset: Dataset) -> tuple[int, int]:
    """The smallest and largest stored value the header allows."""
    bits = int(dataset.get("BitsStored") or dataset.BitsAllocated)
    if dataset.get("PixelRepresentation") == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _interpret(dataset: Dataset, header: Dataset, stored: np.ndarray, source: ImageSource) -> DecodedSlice:
    """Stored values -> physical or display values, with the frame's geometry.

    CT becomes Hounsfield units whatever its photometric interpretation, which only says how to display it;
    other grey images stay in modality units with their VOI window, MONOCHROME1 inverted; colour becomes RGB.
    """
    geometry: dict[str, Any] = {
        "pixel_spacing_mm": _pixel_spacing(header),
        "slice_thickness_mm": _positive_float(header.get("SliceThickness")),
    }
    if source.photometric not in _GREY:
        palette = source.photometric == _PALETTE
        rgb = apply_color_lut(stored, dataset) if palette else stored
        max_value = np.iinfo(rgb.dtype).max if palette else _stored_range(dataset)[1]
        return DecodedSlice(
            pixels=rgb.astype(np.float32), intensity="display", source=source, max_value=float(max_value), **geometry
        )
    values = apply_rescale(stored, header).astype(np.float32)
    low, high = sorted(float(value) for value in apply_rescale(np.asarray(_stored_range(dataset)), header))
    window = _voi_window(header)
    intensity: IntensityKind = "hounsfield" if source.modality == "CT" else "raw"
    if intensity == "raw" and source.photometric == "MONOCHROME1":
        values = np.float32(low + high) - values
        window = (low + high - window[0], window[1]) if window else None
    return DecodedSlice(
        pixels=values, intensity=intensity, source=source, max_value=high, voi_window=window, **geometry
    )


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, MultiValue) and len(value) else value


def _positive_float(value: Any) -> float | None:
    try:
        number = float(_first(value))
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def _voi_window(header: Dataset) -> tuple[float, float] | None:
    """The first (center, width) VOI window, if the file has a usable one."""
    width = _positive_float(header.get("WindowWidth"))
    try:
        center = float(_first(header.get("WindowCenter")))
    except (TypeError, ValueError):
        return None
    return (center, width) if width is not None and np.isfinite(center) else None


def _pixel_spacing(header: Dataset) -> tuple[float, float] | None:
    """(row, column) spacing in mm from Pixel Spacing, if present and valid."""
    value = header.get("PixelSpacing")
    if not isinstance(value, MultiValue) or len(value) != 2:
        return None
    row, column = (_positive_float(part) for part in value)
    return (row, column) if row is not None and column is not None else None


def quiet_pydicom() -> None:
    """Keep pydicom from quoting element values (possible PHI) in logs and warnings: process-wide, at start-up."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
