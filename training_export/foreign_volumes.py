"""Studies an MRI tumour segmenter trained on our synthetic cases should warn about (the OOD checks' negatives):
real files nobody here wrote (nibabel's healthy head `anatomical.nii` and `standard.nii.gz`, pydicom's `MR_small.dcm`),
a CT head volume in Hounsfield units sent as MR, noise, a blank volume, and synthetic cases sent wrongly: one sequence
sent as all four, the sequences mislabelled (T2 as T1, FLAIR as T1ce, ...), a header with the wrong voxel size.
Each file is sent as every sequence the model needs (a study missing sequences is refused before the model runs),
one upload per sequence with its `sequence_type`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid
from scipy import ndimage

from training_export.synthetic_mri import synthetic_case

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
AIR_HU, BONE_HU = -1000.0, 1000.0


@dataclass(frozen=True)
class ForeignStudy:
    """One study as uploads (file name, bytes), with the sequence each upload is sent as."""

    name: str
    uploads: list[tuple[str, bytes]]
    sequence_types: list[str]


def nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    return nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine).to_bytes()


def as_every_sequence(name: str, file_name: str, data: bytes, sequences: Sequence[str]) -> ForeignStudy:
    return ForeignStudy(name, [(f"{s}_{file_name}", data) for s in sequences], list(sequences))


def dicom_copies(paths: Sequence[str | Path], sequences: Sequence[str]) -> ForeignStudy:
    """One DICOM series (one or more files) as one series per sequence: new series and instance UIDs, so the copies
    are not taken for one series sent twice."""
    uploads = []
    for sequence in sequences:
        series_uid = generate_uid()
        for path in paths:
            dataset = pydicom.dcmread(path)
            dataset.SeriesInstanceUID, dataset.SOPInstanceUID = series_uid, generate_uid()
            dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
            buffer = DicomBytesIO()
            dataset.save_as(buffer, enforce_file_format=True)
            uploads.append((f"{sequence}_{Path(path).name}", buffer.getvalue()))
    return ForeignStudy("+".join(Path(p).name for p in paths), uploads, list(sequences))


def ct_head_volume(seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """A CT head in HU on a synthetic case's grid: brain 20-45 HU, CSF-like 5 HU, a bone shell, air outside."""
    case = synthetic_case(seed, (96, 96, 72), (2.0, 2.0, 2.0))
    t2 = case.volume.data[2]
    brain = t2 > 0
    hu = np.where(t2 > np.percentile(t2[brain], 90), 5.0, 35.0) + np.random.default_rng(seed).normal(0, 4, t2.shape)
    hu[case.labels > 0] = 45.0
    head = ndimage.binary_dilation(brain, iterations=4)
    volume = np.where(brain, hu, np.where(head, BONE_HU, AIR_HU))
    return np.round(volume), case.volume.affine


def foreign_studies(sequences: Sequence[str]) -> list[ForeignStudy]:
    """Every foreign study, each sent as all `sequences`."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    rng = np.random.default_rng(0)
    case = synthetic_case(9, (96, 96, 72), (2.0, 2.0, 2.0))
    studies = [
        as_every_sequence(name, name, (NIBABEL_DATA / name).read_bytes(), sequences)
        for name in ("anatomical.nii", "standard.nii.gz")
    ]
    studies.append(dicom_copies([get_testdata_file("MR_small.dcm")], sequences))
    ct, ct_affine = ct_head_volume()
    studies.append(as_every_sequence("ct_head_as_mr", "ct.nii", nifti_bytes(ct, ct_affine), sequences))
    studies.append(ForeignStudy("noise", [(f"{s}_noise.nii", nifti_bytes(rng.uniform(0, 1000, (96, 96, 72)), affine))
                                          for s in sequences], list(sequences)))
    studies.append(as_every_sequence("blank", "blank.nii", nifti_bytes(np.zeros((96, 96, 72)), affine), sequences))
    t1 = nifti_bytes(case.volume.data[0], case.volume.affine)
    studies.append(ForeignStudy("synthetic_t1_as_every_sequence", [(f"{s}.nii", t1) for s in sequences],
                                list(sequences)))
    swapped = [case.volume.sequences.index(s) for s in ("T2", "FLAIR", "T1", "T1ce")]
    studies.append(ForeignStudy("synthetic_sequences_mislabelled", [
        (f"{s}.nii", nifti_bytes(case.volume.data[i], case.volume.affine)) for s, i in zip(case.volume.sequences, swapped)
    ], list(case.volume.sequences)))
    for factor in (4.0, 0.25):
        wrong = case.volume.affine.copy()
        wrong[:3, :3] *= factor
        studies.append(ForeignStudy(f"voxel_size_x{factor:g}", [
            (f"{s}.nii", nifti_bytes(case.volume.data[i], wrong)) for i, s in enumerate(case.volume.sequences)
        ], list(case.volume.sequences)))
    return studies
