"""NIfTI-1/-2 single files (.nii, .nii.gz) -> RawSeries through nibabel, with the header checked against the bytes.

Refused with a clear message: header-only pairs (.hdr/.img) and Analyze files, more than four dimensions, a
single voxel, non-numeric voxel types, a header announcing more voxels than allowed or more voxel data than the
file holds (a lying header), a gzip stream expanding past that size, non-finite voxels and degenerate affines.
A 4D file gives one RawSeries per volume (one per sequence).
"""

from __future__ import annotations

import io
import zlib
from pathlib import PurePath

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError

from core.errors import ImageTooLarge, InvalidImageFormat
from core.volumes import RawSeries

GZIP_SIGNATURE = b"\x1f\x8b"
_HEADER_BYTES = {348: (nib.Nifti1Header, nib.Nifti1Image), 540: (nib.Nifti2Header, nib.Nifti2Image)}
_SINGLE_FILE_MAGIC = (b"n+1", b"n+2")
_MAGICS = (*_SINGLE_FILE_MAGIC, b"ni1", b"ni2")
_MAGIC_OFFSET = {348: 344, 540: 4}
_MAX_HEADER_BYTES = 544
_MAX_DIMENSIONS = 4


def is_nifti(data: bytes) -> bool:
    """True for an uncompressed NIfTI-1/-2 header (size field and magic), or any gzip stream (checked when decoded)."""
    classes = _header_classes(data)
    return data.startswith(GZIP_SIGNATURE) or (classes is not None and data[_MAGIC_OFFSET[classes[2]]:][:3] in _MAGICS)


def decode_nifti(data: bytes, file_name: str | None, *, max_voxels: int) -> list[RawSeries]:
    """One RawSeries per 3D volume of the file (a 4D file holds one volume per sequence)."""
    compressed = data.startswith(GZIP_SIGNATURE)
    head = _gunzip(data, _MAX_HEADER_BYTES) if compressed else data[:_MAX_HEADER_BYTES]
    header_class, image_class, header_size = _classes_or_refuse(head)
    header = _parse_header(header_class, head[:header_size])
    shape = _checked_shape(header, max_voxels)
    needed = int(header["vox_offset"]) + int(np.prod(shape)) * header.get_data_dtype().itemsize
    payload = _gunzip(data, needed) if compressed else data
    if len(payload) < needed:
        raise InvalidImageFormat(
            f"The NIfTI header announces {needed} bytes of header and voxel data but the file holds {len(payload)}; "
            "the file is truncated or its header is wrong.", {"format": "nifti", "needed_bytes": needed},
        )
    image = image_class.from_bytes(payload[:needed])
    volumes = np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape)
    if not np.isfinite(volumes).all():
        raise InvalidImageFormat("The NIfTI volume holds NaN or infinite values.", {"format": "nifti"})
    affine = _checked_affine(image.affine)
    description = header["descrip"].item().decode("latin-1").strip("\x00 ") or None
    name = PurePath(file_name).name if file_name else None
    return [
        RawSeries(data=np.ascontiguousarray(volumes[..., index]), affine=affine, format="nifti", file_name=name,
                  description=description)
        for index in range(shape[3])
    ]


def _header_classes(data: bytes) -> tuple[type, type, int] | None:
    """(header class, image class, header size) from the leading sizeof_hdr field, in either byte order."""
    if len(data) < 4:
        return None
    for order in ("<", ">"):
        size = int(np.frombuffer(data[:4], dtype=f"{order}i4")[0])
        if size in _HEADER_BYTES and len(data) >= size:
            return (*_HEADER_BYTES[size], size)
    return None


def _classes_or_refuse(head: bytes) -> tuple[type, type, int]:
    classes = _header_classes(head)
    if classes is None:
        raise InvalidImageFormat("The file is not a NIfTI-1 or NIfTI-2 image.", {"format": "nifti"})
    return classes


def _parse_header(header_class: type, head: bytes) -> nib.Nifti1Header:
    """The fixed-size header alone (extensions are read with the image)."""
    try:
        header = header_class.from_fileobj(io.BytesIO(head), check=True)
    except (HeaderDataError, ValueError, TypeError) as exc:
        raise InvalidImageFormat("The NIfTI header is invalid.", {"format": "nifti", "reason": str(exc)[:200]}) from exc
    if header["magic"].item() not in _SINGLE_FILE_MAGIC:
        raise InvalidImageFormat(
            "Only single-file NIfTI (.nii / .nii.gz) is accepted, not .hdr/.img pairs or Analyze files.",
            {"format": "nifti"},
        )
    return header


def _checked_shape(header: nib.Nifti1Header, max_voxels: int) -> tuple[int, int, int, int]:
    """(X, Y, Z, volumes) after the dimension, voxel-type and size checks."""
    shape = tuple(int(n) for n in header.get_data_shape())
    dtype = header.get_data_dtype()
    details = {"format": "nifti", "shape": list(shape)}
    if dtype.kind not in "iuf" or dtype.fields is not None:
        raise InvalidImageFormat(f"NIfTI voxels of type {dtype} are not accepted; send scalar intensities.", details)
    if len(shape) > _MAX_DIMENSIONS and any(n > 1 for n in shape[_MAX_DIMENSIONS:]):
        raise InvalidImageFormat(
            f"The NIfTI image has {len(shape)} dimensions; send 3D volumes or one 4D file with a volume per sequence.",
            details,
        )
    spatial = (shape + (1, 1, 1))[:3]
    volumes = shape[3] if len(shape) > 3 else 1
    if min(spatial + (volumes,)) < 1 or int(np.prod(spatial)) < 2:
        raise InvalidImageFormat("The NIfTI image holds no volume (a single voxel or an empty dimension).", details)
    voxels = int(np.prod(spatial)) * volumes
    if voxels > max_voxels:
        raise ImageTooLarge(f"The NIfTI image holds {voxels} voxels; at most {max_voxels} are accepted.",
                            {**details, "max_voxels": max_voxels})
    return (*spatial, volumes)  # type: ignore[return-value]


def _checked_affine(affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InvalidImageFormat("The NIfTI image has an invalid (non-finite or degenerate) voxel-to-world affine.",
                                 {"format": "nifti"})
    return affine


def _gunzip(data: bytes, limit: int) -> bytes:
    """At most `limit` decompressed bytes of a (possibly multi-member) gzip stream; never more, whatever it holds."""
    output = bytearray()
    remaining = data
    try:
        while remaining and len(output) < limit:
            decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
            output += decompressor.decompress(remaining, limit - len(output))
            if not decompressor.eof:
                break
            remaining = decompressor.unused_data
    except zlib.error as exc:
        raise InvalidImageFormat("The gzip stream is damaged.", {"format": "nifti", "reason": str(exc)[:200]}) from exc
    return bytes(output)
