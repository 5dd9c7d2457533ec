"""Builders of MRI uploads for the tests: NIfTI bytes, DICOM series, zips, small cards; real files' paths."""

from __future__ import annotations

import gzip
import io
import os
import struct
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.uid import generate_uid

from core.cards.base import DEMO_INTENDED_USE, Provenance
from core.cards.segmentation import MRI_SEQUENCES, SegmentationCard, VolumeInputSpec
from core.settings import LimitSettings
from training_export.synthetic_mri import dicom_series, synthetic_case

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
LIMITS = LimitSettings()


TOLERANT_INPUT = VolumeInputSpec(optional_sequences=list(MRI_SEQUENCES), sequence_dropout=0.2)
"""A model trained with sequence dropout: any sequence may be missing (zero-filled)."""


def card(**changes) -> SegmentationCard:
    """A valid card (BraTS labels, enhancing = 4, tolerant of missing sequences) with optional field overrides."""
    fields = {"name": "test segmenter", "intended_use": DEMO_INTENDED_USE, "input": TOLERANT_INPUT,
              "provenance": Provenance(source="tests", synthetic_data=True)}
    return SegmentationCard(**{**fields, **changes})


def nifti_bytes(data: np.ndarray, affine: np.ndarray, *, compressed: bool = False, dtype=np.int16,
                nifti2: bool = False) -> bytes:
    """(X, Y, Z) or (X, Y, Z, T) voxels as a single-file NIfTI."""
    image_class = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    raw = image_class(np.asarray(data).astype(dtype), affine).to_bytes()
    return gzip.compress(raw) if compressed else raw


def four_d_nifti(case, **kwargs) -> bytes:
    """A synthetic case's four sequences as one 4D NIfTI, volumes in the card's order."""
    return nifti_bytes(np.moveaxis(case.volume.data, 0, -1), case.volume.affine, **kwargs)


def case_dicom_files(case, sequences=MRI_SEQUENCES, patient_id: str = "P0001") -> dict[str, list[bytes]]:
    """Each sequence of a synthetic case as its own DICOM series (one study, one frame of reference)."""
    study, frame = generate_uid(), generate_uid()
    return {
        sequence: dicom_series(case.volume.data[MRI_SEQUENCES.index(sequence)], case.volume.affine, sequence,
                               patient_id=patient_id, study_uid=study, frame_of_reference_uid=frame)
        for sequence in sequences
    }


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def patch_central_directory(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    """Overwrite one field of every zip central directory entry (what zipfile trusts for sizes and flags)."""
    patched, start = bytearray(data), 0
    while (start := patched.find(b"PK\x01\x02", start)) >= 0:
        struct.pack_into(fmt, patched, start + offset, value)
        start += 4
    return bytes(patched)


def small_case(seed: int = 3, *, tumour: bool = True):
    """A small anisotropic synthetic case: 48 x 44 x 30 voxels of 4 x 4 x 5 mm (`tumour=False`: a healthy brain)."""
    return synthetic_case(seed, (48, 44, 30), (4.0, 4.0, 5.0), tumour=tumour)


def temp_dir_entries() -> set[str]:
    """What the system temp folder holds now (to prove nothing was written there; use the `private_temp_dir` fixture
    so that other processes' files do not show up)."""
    import tempfile

    return set(os.listdir(tempfile.gettempdir()))
