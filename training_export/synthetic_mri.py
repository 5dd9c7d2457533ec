"""Deterministic synthetic brain MRI cases: four co-registered sequences (T1, T1ce, T2, FLAIR) and BraTS labels.

The head is skull-stripped like BraTS data (background exactly 0). Anatomy is laid out in millimetres, so the same
seed gives about the same case on any voxel grid: an ellipsoidal brain with a lumpy surface, a CSF rim, cortex
(grey matter) around white matter, and two lateral ventricles. The tumour is a lobulated mass with an enhancing
rim (label 4) around a necrotic core (label 1; absent in small solid tumours), inside irregular oedema (label 2)
that stays within the brain and out of the ventricles. Sizes, shapes and positions vary with the seed. Each
sequence gets its own tissue contrasts, a random gain, a smooth multiplicative bias field, texture and Rician noise.

`dicom_series` writes a sequence as an MR DICOM series (for demos, tests and benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from scipy import ndimage

from core.cards.segmentation import MRI_SEQUENCES
from core.volumes import DecodedVolume, SeriesSource

WM, GM, CSF, NCR, ED, ET = range(6)
TISSUE_MEANS: dict[str, tuple[float, ...]] = {
    #         WM     GM     CSF    NCR    ED     ET
    "T1": (700.0, 520.0, 220.0, 260.0, 430.0, 470.0),
    "T1ce": (700.0, 530.0, 220.0, 240.0, 440.0, 1050.0),
    "T2": (360.0, 520.0, 1000.0, 820.0, 800.0, 560.0),
    "FLAIR": (420.0, 560.0, 110.0, 520.0, 880.0, 700.0),
}
"""Mean signal of each tissue per sequence (arbitrary scanner units, relative contrasts as in clinical images)."""
TISSUE_LABEL = {NCR: 1, ED: 2, ET: 4}
ACQUISITION: dict[str, dict[str, float | str]] = {
    "T1": {"RepetitionTime": 600.0, "EchoTime": 12.0, "SeriesDescription": "AX T1 SE"},
    "T1ce": {"RepetitionTime": 600.0, "EchoTime": 12.0, "SeriesDescription": "AX T1 POST GAD",
             "ContrastBolusAgent": "GADOLINIUM"},
    "T2": {"RepetitionTime": 4500.0, "EchoTime": 95.0, "SeriesDescription": "AX T2 TSE"},
    "FLAIR": {"RepetitionTime": 9000.0, "EchoTime": 120.0, "InversionTime": 2500.0, "SeriesDescription": "AX FLAIR"},
}
"""Acquisition tags and descriptions written to DICOM series, typical of each sequence."""


@dataclass(frozen=True)
class SyntheticCase:
    """A generated case: the decoded 4-sequence volume and its ground-truth label map (X, Y, Z) in BraTS values."""

    volume: DecodedVolume
    labels: np.ndarray


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, ...], scale_mm: float) -> np.ndarray:
    """Unit-variance noise varying over about `scale_mm`: a coarse random grid, cubic-interpolated onto `shape`."""
    coarse = tuple(max(2, int(np.ceil(n * s / scale_mm)) + 1) for n, s in zip(shape, spacing))
    field = ndimage.zoom(rng.standard_normal(coarse).astype(np.float32), [n / c for n, c in zip(shape, coarse)], order=1)
    field = field[tuple(slice(0, n) for n in shape)]
    return ((field - field.mean()) / max(float(field.std()), 1e-6)).astype(np.float32)


def ras_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """A RAS+ affine with the grid centred on the world origin."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2.0
    return affine


def _world_grid(shape: tuple[int, int, int], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axes = [np.arange(n, dtype=np.float32) * affine[i, i] + affine[i, 3] for i, n in enumerate(shape)]
    return np.meshgrid(*axes, indexing="ij", sparse=True)


def _rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    angles = np.deg2rad(rng.uniform(-max_degrees, max_degrees, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(angles[0]), -np.sin(angles[0])], [0, np.sin(angles[0]), np.cos(angles[0])]])
    ry = np.array([[np.cos(angles[1]), 0, np.sin(angles[1])], [0, 1, 0], [-np.sin(angles[1]), 0, np.cos(angles[1])]])
    rz = np.array([[np.cos(angles[2]), -np.sin(angles[2]), 0], [np.sin(angles[2]), np.cos(angles[2]), 0], [0, 0, 1]])
    return rx @ ry @ rz


def _ellipsoid_radius(grid: tuple[np.ndarray, ...], center: np.ndarray, semi: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Normalised radius of every voxel with respect to a rotated ellipsoid (< 1 inside)."""
    offsets = [g - c for g, c in zip(grid, center)]
    total = 0.0
    for row in range(3):
        local = sum(rotation[row, col] * offsets[col] for col in range(3))
        total = total + (local / semi[row]) ** 2
    return np.sqrt(total).astype(np.float32)


def _anatomy(rng: np.random.Generator, grid: tuple[np.ndarray, ...], shape, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Tissue map (WM/GM/CSF, -1 outside the brain) and the brain's normalised radius."""
    semi = np.array([rng.uniform(62, 72), rng.uniform(80, 92), rng.uniform(60, 70)])
    radius = _ellipsoid_radius(grid, rng.uniform(-4, 4, 3), semi, _rotation(rng, 6))
    radius = radius + 0.025 * smooth_field(rng, shape, spacing, 25.0)
    tissue = np.full(shape, -1, dtype=np.int8)
    cortex_depth = 0.14 + 0.04 * smooth_field(rng, shape, spacing, 15.0)
    tissue[radius < 1.0] = CSF
    tissue[radius < 0.965] = GM
    tissue[radius < 0.965 - cortex_depth] = WM
    scale = rng.uniform(0.8, 1.25)
    for side in (-1.0, 1.0):
        center = np.array([side * rng.uniform(9, 13), rng.uniform(-6, 6), rng.uniform(4, 12)])
        ventricle = _ellipsoid_radius(grid, center, np.array([6.0, 24.0, 9.0]) * scale, _rotation(rng, 10))
        tissue[ventricle < 1.0] = CSF
    return tissue, radius


def _tumour(rng: np.random.Generator, grid, shape, spacing, tissue: np.ndarray, brain_radius: np.ndarray) -> None:
    """Paint oedema, enhancing rim and necrotic core into `tissue` in place."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    center = direction * rng.uniform(0.1, 0.55) * np.array([62.0, 80.0, 60.0])
    core_radius = rng.uniform(7.0, 20.0)
    core = _ellipsoid_radius(grid, center, core_radius * rng.uniform(0.75, 1.25, 3), _rotation(rng, 90))
    core = core + 0.12 * smooth_field(rng, shape, spacing, 8.0)
    oedema_reach = core_radius + rng.uniform(4.0, 16.0)
    oedema = _ellipsoid_radius(grid, center, oedema_reach * rng.uniform(0.8, 1.2, 3), _rotation(rng, 90))
    oedema = oedema + 0.12 * smooth_field(rng, shape, spacing, 14.0)
    inside_brain = (brain_radius < 0.95) & (tissue != CSF)
    tissue[(oedema < 1.0) & inside_brain] = ED
    tissue[(core < 1.0) & (brain_radius < 0.97)] = ET
    rim = rng.uniform(3.5, 7.0) / core_radius
    if rim < 0.6:
        tissue[(core < 1.0 - rim) & (brain_radius < 0.97)] = NCR


def _render(rng: np.random.Generator, sequence: str, tissue: np.ndarray, shape, spacing) -> np.ndarray:
    """One sequence: tissue means with texture, a little blur, a bias field, gain and Rician noise; 0 outside."""
    means = np.asarray(TISSUE_MEANS[sequence], dtype=np.float32)
    brain = tissue >= 0
    image = np.where(brain, means[np.clip(tissue, 0, None)], 0.0).astype(np.float32)
    image *= 1.0 + 0.04 * smooth_field(rng, shape, spacing, 4.0)
    image = ndimage.gaussian_filter(image, sigma=[0.6 / s for s in spacing])
    image *= np.exp(0.18 * smooth_field(rng, shape, spacing, 80.0)) * rng.uniform(0.6, 1.6)
    sigma = rng.uniform(0.015, 0.04) * float(image[brain].mean())
    noisy = np.hypot(image + sigma * rng.standard_normal(shape, dtype=np.float32), sigma * rng.standard_normal(shape, dtype=np.float32))
    return np.where(brain, noisy, 0.0).astype(np.float32)


def synthetic_case(
    seed: int, shape: tuple[int, int, int] = (96, 96, 64), spacing: tuple[float, float, float] = (2.0, 2.0, 2.0),
    *, tumour: bool = True,
) -> SyntheticCase:
    """Generate case `seed` on a RAS+ grid of `shape` voxels of `spacing` mm (rounded to whole scanner units);
    `tumour=False`: the same kind of brain without a tumour (all labels 0)."""
    rng = np.random.default_rng(seed)
    affine = ras_affine(shape, spacing)
    grid = _world_grid(shape, affine)
    tissue, brain_radius = _anatomy(rng, grid, shape, spacing)
    if tumour:
        _tumour(rng, grid, shape, spacing, tissue, brain_radius)
    data = np.stack([np.round(_render(rng, sequence, tissue, shape, spacing)) for sequence in MRI_SEQUENCES])
    labels = np.zeros(shape, dtype=np.uint8)
    for kind, value in TISSUE_LABEL.items():
        labels[tissue == kind] = value
    sources = tuple(
        SeriesSource(sequence=s, format="nifti", description=str(ACQUISITION[s]["SeriesDescription"])) for s in MRI_SEQUENCES
    )
    volume = DecodedVolume(data=data, affine=affine, sequences=MRI_SEQUENCES, sources=sources, reference_sequence="T1")
    return SyntheticCase(volume=volume, labels=labels)


def dicom_series(
    volume: np.ndarray, affine: np.ndarray, sequence: str, *, patient_id: str, study_uid: str, frame_of_reference_uid: str
) -> list[bytes]:
    """Write one (X, Y, Z) volume with a RAS+ affine as an MR DICOM series, one int16 slice per file.

    Column index = x, row index = y, one file per z; positions and orientation are in DICOM's LPS patient system.
    """
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    column_step, row_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    pixels = np.clip(np.round(volume), -32768, 32767).astype(np.int16)
    series_uid, now = generate_uid(), datetime.now(UTC)
    files = []
    for index in range(volume.shape[2]):
        dataset = _mr_slice_header(sequence, patient_id, study_uid, series_uid, frame_of_reference_uid, now)
        dataset.InstanceNumber = index + 1
        dataset.ImagePositionPatient = [round(float(v), 4) for v in lps[:3, 3] + index * slice_step]
        dataset.ImageOrientationPatient = [
            round(float(v), 6) for v in (*column_step / np.linalg.norm(column_step), *row_step / np.linalg.norm(row_step))
        ]
        dataset.PixelSpacing = [round(float(np.linalg.norm(row_step)), 4), round(float(np.linalg.norm(column_step)), 4)]
        dataset.SliceThickness = round(float(np.linalg.norm(slice_step)), 4)
        dataset.SpacingBetweenSlices = dataset.SliceThickness
        plane = np.ascontiguousarray(pixels[:, :, index].T)
        dataset.Rows, dataset.Columns = plane.shape
        dataset.PixelData = plane.tobytes()
        buffer = DicomBytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        files.append(buffer.getvalue())
    return files


def _mr_slice_header(
    sequence: str, patient_id: str, study_uid: str, series_uid: str, frame_uid: str, now: datetime
) -> Dataset:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = MRImageStorage
    dataset.SOPClassUID = MRImageStorage
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.Modality = "MR"
    dataset.PatientID, dataset.PatientName, dataset.PatientBirthDate, dataset.PatientSex = patient_id, "", "", ""
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    dataset.StudyDate = dataset.SeriesDate = dataset.ContentDate = now.strftime("%Y%m%d")
    dataset.StudyTime = dataset.SeriesTime = dataset.ContentTime = now.strftime("%H%M%S")
    dataset.StudyID, dataset.AccessionNumber, dataset.ReferringPhysicianName = "1", "", ""
    dataset.SeriesNumber = MRI_SEQUENCES.index(sequence) + 1
    dataset.Manufacturer = "NeuroNova synthetic"
    dataset.ScanningSequence, dataset.SequenceVariant, dataset.MRAcquisitionType = "SE", "NONE", "2D"
    for keyword, value in ACQUISITION[sequence].items():
        setattr(dataset, keyword, value)
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 1
    dataset.RescaleSlope, dataset.RescaleIntercept = 1, 0
    return dataset
