"""DICOM slices -> one RawSeries per series: grouped by SeriesInstanceUID, sorted along the slice normal, with the
voxel-to-RAS affine built from Image Orientation / Position (Patient) and Pixel Spacing.

Voxel (x, y, z) is (column, row, slice); DICOM's LPS patient coordinates become RAS by negating x and y.
Each slice is decoded by `preprocessing.dicom.decode_dicom_slice` (transfer syntaxes, rescale, MONOCHROME1), so
2D and 3D uploads share one DICOM decoder. Objects without pixel data (reports, DICOMDIR) are skipped.
The headers kept for a DICOM SEG are stripped of pixel data, private tags and identifying attributes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np
from pydicom.dataset import Dataset

from core.errors import ImageTooLarge, InvalidImageFormat
from core.volumes import RawSeries
from preprocessing.decode import sniff_format
from preprocessing.dicom import decode_dicom_slice, read_dicom

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientBirthDate", "PatientBirthTime", "PatientAddress", "PatientTelephoneNumbers",
    "OtherPatientNames", "OtherPatientIDs", "OtherPatientIDsSequence", "PatientMotherBirthName", "MilitaryRank",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "NameOfPhysiciansReadingStudy",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "AccessionNumber",
    "RequestingPhysician", "PhysiciansOfRecord", "PatientComments", "DeviceSerialNumber",
)
_EMPTY_WHEN_REQUIRED = ("PatientName", "PatientBirthDate", "ReferringPhysicianName", "AccessionNumber")
_ACQUISITION_TAGS = ("RepetitionTime", "EchoTime", "InversionTime")
_POSITION_TOLERANCE_MM = 1e-3
_SPACING_TOLERANCE = 0.1


@dataclass(frozen=True)
class _Slice:
    data: bytes
    header: Dataset
    position: np.ndarray


def is_dicom(data: bytes) -> bool:
    """DICOM file format (preamble + DICM) or a header-less dataset pydicom can read."""
    return sniff_format(data) == "dicom"


def decode_dicom_series(
    files: Sequence[tuple[str | None, bytes]], *, max_voxels: int, modalities: Sequence[str] | None
) -> list[tuple[int, RawSeries]]:
    """(index of its first file in `files`, series) for every image series, in order of first appearance.

    InvalidImageFormat when no file holds an image.
    """
    groups: dict[str, list[tuple[str | None, bytes, Dataset]]] = defaultdict(list)
    first_file: dict[str, int] = {}
    for index, (name, data) in enumerate(files):
        header = _read_header(data)
        if "PixelData" not in header or "Rows" not in header:
            continue
        uid = str(header.get("SeriesInstanceUID") or "unknown-series")
        first_file.setdefault(uid, index)
        groups[uid].append((name, data, header))
    if not groups:
        raise InvalidImageFormat("No DICOM image was found in the upload (only non-image objects).", {"format": "dicom"})
    voxels = sum(int(h.Rows) * int(h.Columns) * int(h.get("NumberOfFrames") or 1) for g in groups.values() for *_, h in g)
    if voxels > max_voxels:
        raise ImageTooLarge(f"The DICOM series hold {voxels} voxels; at most {max_voxels} are accepted.",
                            {"format": "dicom", "voxels": voxels, "max_voxels": max_voxels})
    return [(first_file[uid], _decode_series(members, max_voxels, modalities)) for uid, members in groups.items()]


def _read_header(data: bytes) -> Dataset:
    try:
        return read_dicom(data, defer_size=64 * 1024)
    except Exception as exc:
        raise InvalidImageFormat("A file could not be read as DICOM: its header is truncated or damaged.",
                                 {"format": "dicom", "reason": type(exc).__name__}) from exc


def _decode_series(
    members: list[tuple[str | None, bytes, Dataset]], max_voxels: int, modalities: Sequence[str] | None
) -> RawSeries:
    first = members[0][2]
    details = {"format": "dicom", "series_description": _text(first, "SeriesDescription"), "slices": len(members)}
    if int(first.get("NumberOfFrames") or 1) > 1:
        raise InvalidImageFormat(
            "Multi-frame (enhanced) DICOM volumes are not supported; send the series as single-frame slices.", details)
    normal = _normal(first, details)
    slices = []
    for _, data, header in members:
        if not _same_geometry(header, first, details):
            raise InvalidImageFormat("The slices of one series differ in size or orientation.", details)
        slices.append(_Slice(data=data, header=header, position=_position(header, details)))
    slices.sort(key=lambda s: float(s.position @ normal))
    affine = _affine(first, slices, normal, details)
    planes = [decode_dicom_slice(s.data, max_pixels=max_voxels, modalities=modalities) for s in slices]
    volume = np.stack([plane.pixels.T for plane in planes], axis=-1).astype(np.float32)
    return RawSeries(
        data=volume, affine=affine, format="dicom", file_name=_file_name(members[0][0]),
        series_uid=_text(first, "SeriesInstanceUID"),
        description=_text(first, "SeriesDescription") or _text(first, "ProtocolName"),
        acquisition=_acquisition(first), transfer_syntax=planes[0].source.transfer_syntax,
        headers=tuple(deidentified_header(s.header) for s in slices),
    )


def _text(dataset: Dataset, keyword: str) -> str | None:
    value = dataset.get(keyword)
    return str(value).strip() or None if value is not None else None


def _file_name(name: str | None) -> str | None:
    return PurePath(name).name if name else None


def _floats(dataset: Dataset, keyword: str, count: int, details: dict) -> np.ndarray:
    value = dataset.get(keyword)
    try:
        numbers = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        numbers = np.array([])
    if numbers.shape != (count,) or not np.isfinite(numbers).all():
        raise InvalidImageFormat(f"A DICOM slice lacks a valid {keyword}; the volume geometry is unknown.",
                                 {**details, "tag": keyword})
    return numbers


def _normal(header: Dataset, details: dict) -> np.ndarray:
    """The unit slice normal (row direction x column direction), checking the orientation vectors."""
    cosines = _floats(header, "ImageOrientationPatient", 6, details)
    normal = np.cross(cosines[:3], cosines[3:])
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-2):
        raise InvalidImageFormat("A DICOM slice has an invalid ImageOrientationPatient.", details)
    return normal / np.linalg.norm(normal)


def _same_geometry(header: Dataset, first: Dataset, details: dict) -> bool:
    same_size = (int(header.Rows), int(header.Columns)) == (int(first.Rows), int(first.Columns))
    return same_size and np.allclose(_floats(header, "ImageOrientationPatient", 6, details),
                                     _floats(first, "ImageOrientationPatient", 6, details), atol=1e-3)


def _position(header: Dataset, details: dict) -> np.ndarray:
    return _floats(header, "ImagePositionPatient", 3, details)


def _affine(first: Dataset, slices: list[_Slice], normal: np.ndarray, details: dict) -> np.ndarray:
    """Voxel (column, row, slice) -> RAS+ mm."""
    cosines = _floats(first, "ImageOrientationPatient", 6, details)
    row_spacing, column_spacing = _floats(first, "PixelSpacing", 2, details)
    if min(row_spacing, column_spacing) <= 0:
        raise InvalidImageFormat("A DICOM slice has a non-positive PixelSpacing.", details)
    positions = np.array([s.position for s in slices])
    if len(slices) > 1:
        steps = np.diff(positions @ normal, axis=0)
        if steps.min() < _POSITION_TOLERANCE_MM:
            raise InvalidImageFormat(
                "Two slices of one series share a position (several echoes, phases or time points?); send one "
                "3D series per sequence.", details)
        if steps.max() - steps.min() > _SPACING_TOLERANCE * np.median(steps):
            raise InvalidImageFormat("The slices of one series are not evenly spaced (gaps or overlaps).",
                                     {**details, "min_step_mm": float(steps.min()), "max_step_mm": float(steps.max())})
        slice_step = (positions[-1] - positions[0]) / (len(slices) - 1)
    else:
        thickness = _first_positive(first, ("SpacingBetweenSlices", "SliceThickness"))
        slice_step = normal * thickness
    lps = np.eye(4)
    lps[:3, 0] = cosines[:3] * column_spacing
    lps[:3, 1] = cosines[3:] * row_spacing
    lps[:3, 2] = slice_step
    lps[:3, 3] = positions[0]
    return LPS_TO_RAS @ lps


def _first_positive(header: Dataset, keywords: Sequence[str]) -> float:
    for keyword in keywords:
        try:
            value = float(header.get(keyword))
        except (TypeError, ValueError):
            continue
        if np.isfinite(value) and value > 0:
            return value
    return 1.0


def _acquisition(header: Dataset) -> dict[str, float]:
    values = {}
    for keyword in _ACQUISITION_TAGS:
        try:
            value = float(header.get(keyword))
        except (TypeError, ValueError):
            continue
        if np.isfinite(value):
            values[keyword] = value
    values["contrast"] = 1.0 if _text(header, "ContrastBolusAgent") else 0.0
    return values


def deidentified_header(header: Dataset) -> Dataset:
    """A copy without pixel data, private tags or identifying attributes (type-2 ones kept empty)."""
    kept = Dataset()
    kept.update({tag: element for tag, element in header.items() if tag != 0x7FE00010})
    kept.file_meta = getattr(header, "file_meta", Dataset())
    kept.remove_private_tags()
    for keyword in IDENTIFYING_KEYWORDS:
        if keyword in kept:
            del kept[keyword]
    for keyword in _EMPTY_WHEN_REQUIRED:
        setattr(kept, keyword, "")
    return kept
