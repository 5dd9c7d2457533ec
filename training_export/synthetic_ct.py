"""Deterministic synthetic axial CT head slices in Hounsfield units, with the lesion mask of each class.

Anatomy (all sizes relative to the image side): air background, an elliptical skull ring of varying thickness and
rotation, a thin CSF rim, grey/white matter parenchyma with smooth texture, lateral ventricles, and a bony sella turcica
at the lower midline. Lesions follow the contract classes (core.cards.CT_CLASSES):

- Glioma: intra-axial, lobulated with a ragged edge, hypodense/mixed, surrounded by hypodense oedema, away from skull.
- Meningioma: extra-axial, well circumscribed, hyperdense, with a broad base on the inner skull table.
- Pituitary: small, round to oval, mildly hyperdense, on the midline at the sella (lower centre of the image).
- No Tumor: no lesion, empty mask.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from core.cards.classification import CT_CLASSES
from core.settings import get_settings

AIR_HU = -1000.0
CSF_HU = 5.0
FIELD_OF_VIEW_MM = 240.0
"""Side of the square field of view a generated slice covers, whatever its pixel size."""

LOWEST_HU = -1024.0
"""The lowest value CT scanners store; also the Rescale Intercept of the DICOM files written here."""

_PLACEMENT_TRIES = 20
_MAX_GLIOMA_CSF_SHARE = 0.1


@dataclass
class _Head:
    """Where the head lies in the image, and the normalised elliptical radius of every pixel (1 = outer skull)."""

    center_x: float
    center_y: float
    semi_x: float
    semi_y: float
    angle: float
    table_thickness: float
    table_wave: tuple[int, float]
    grid_x: np.ndarray
    grid_y: np.ndarray
    radius: np.ndarray
    theta: np.ndarray

    def at(self, u: float, v: float) -> tuple[float, float]:
        """Image (x, y) of head coordinates (u, v): fractions of the semi-axes, u to the right, v downwards."""
        u_px, v_px = u * self.semi_x, v * self.semi_y
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        return self.center_x + u_px * cos - v_px * sin, self.center_y + u_px * sin + v_px * cos

    def polar(self, radius: float, theta: float) -> tuple[float, float]:
        """Image (x, y) at normalised `radius` along head angle `theta` (0 = right, pi/2 = down)."""
        return self.at(radius * np.cos(theta), radius * np.sin(theta))

    def inner_table(self, theta: np.ndarray | float) -> np.ndarray:
        """Normalised radius of the inner skull table along head angle `theta`."""
        waves, phase = self.table_wave
        return 1.0 - self.table_thickness * (1 + 0.25 * np.sin(waves * np.asarray(theta) + phase))

    @cached_property
    def depth(self) -> np.ndarray:
        """Normalised depth of every pixel under the inner skull table (negative in the skull and outside)."""
        return self.inner_table(self.theta) - self.radius

    @cached_property
    def brain(self) -> np.ndarray:
        """Pixels inside the inner skull table."""
        return self.depth > 0


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return field / max(float(field.std()), 1e-9)


def _place_head(rng: np.random.Generator, size: int) -> _Head:
    grid_y, grid_x = np.mgrid[0:size, 0:size].astype(np.float32)
    center_x, center_y = size / 2 + rng.uniform(-0.03, 0.03, 2) * size
    semi_x, semi_y = rng.uniform(0.35, 0.41) * size, rng.uniform(0.42, 0.46) * size
    angle = np.deg2rad(rng.uniform(-8.0, 8.0))
    dx, dy = grid_x - center_x, grid_y - center_y
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = (dx * cos + dy * sin) / semi_x, (-dx * sin + dy * cos) / semi_y
    wave = (int(rng.integers(2, 5)), float(rng.uniform(0, 2 * np.pi)))
    return _Head(
        center_x,
        center_y,
        semi_x,
        semi_y,
        angle,
        rng.uniform(0.04, 0.075),
        wave,
        grid_x,
        grid_y,
        np.hypot(u, v),
        np.arctan2(v, u),
    )


def _ellipse(head: _Head, center: tuple[float, float], semi: tuple[float, float], angle: float) -> np.ndarray:
    """Normalised radius of every pixel with respect to a rotated ellipse (< 1 inside)."""
    dx, dy = head.grid_x - center[0], head.grid_y - center[1]
    cos, sin = np.cos(angle), np.sin(angle)
    return np.hypot((dx * cos + dy * sin) / semi[0], (-dx * sin + dy * cos) / semi[1])


def _normal_head(rng: np.random.Generator, head: _Head, size: int) -> np.ndarray:
    """Air, skull, CSF rim, grey/white matter, ventricles and the sella: a head without a lesion."""
    hu = np.full((size, size), AIR_HU, dtype=np.float32)
    brain = head.brain
    skull = ~brain & (head.radius < 1.0)
    bone = np.clip(rng.uniform(800, 1100) + 200 * _smooth_noise(rng, hu.shape, size / 40), 700, 1500)
    hu[skull] = bone[skull]
    depth = head.depth
    cortex = 0.12 + 0.06 * _smooth_noise(rng, hu.shape, size / 50)
    grey_fraction = 1 / (1 + np.exp(-(cortex - depth) / 0.02))
    white, grey = rng.uniform(24, 30), rng.uniform(34, 40)
    parenchyma = white + (grey - white) * grey_fraction + 1.5 * _smooth_noise(rng, hu.shape, size / 64)
    hu[brain] = parenchyma[brain]
    hu[brain & (depth < 0.015)] = CSF_HU + 3  # thin CSF rim under the inner table
    scale = rng.uniform(0.7, 1.3)
    for side in (-1, 1):
        center = head.at(side * 0.12 * scale, -0.12)
        ventricle = _ellipse(head, center, (0.045 * size * scale, 0.14 * size * scale), head.angle + side * 0.35)
        hu[ventricle < 1] = CSF_HU
    sella = _ellipse(head, head.at(0, 0.74), (0.06 * size, 0.035 * size), head.angle)
    hu[(sella < 1) & (sella > 0.6)] = rng.uniform(600, 900)
    return hu


def _glioma(rng: np.random.Generator, head: _Head, hu: np.ndarray, size: int) -> np.ndarray:
    """Lobulated, ragged, hypodense/mixed intra-axial mass with surrounding oedema, in the hemispheres: away from the
    skull and not hidden in a ventricle (a placement that is mostly CSF is drawn again)."""
    radius_px = rng.uniform(0.055, 0.1) * size
    csf = hu < CSF_HU + 1
    for _ in range(_PLACEMENT_TRIES):
        center = head.polar(rng.uniform(0.2, 0.62 - radius_px / head.semi_x), rng.uniform(0, 2 * np.pi))
        dx, dy = head.grid_x - center[0], head.grid_y - center[1]
        theta, distance = np.arctan2(dy, dx), np.hypot(dx, dy)
        lobes = sum(rng.uniform(0.06, 0.16) * np.sin(k * theta + rng.uniform(0, 2 * np.pi)) for k in range(2, 7))
        boundary = radius_px * (1 + lobes + 0.12 * _smooth_noise(rng, hu.shape, 1.5))
        mask = (distance < boundary) & head.brain
        if (mask & csf).sum() <= _MAX_GLIOMA_CSF_SHARE * mask.sum():
            break
    oedema_extent = rng.uniform(1.6, 2.3)
    oedema = np.clip((oedema_extent - distance / boundary) / (oedema_extent - 1), 0, 1) * (head.brain & ~mask)
    hu -= (rng.uniform(8, 16) * oedema).astype(np.float32)
    core = rng.uniform(6, 18) + rng.uniform(3, 8) * _smooth_noise(rng, hu.shape, 2.0)
    hu[mask] = core[mask]
    return mask


def _meningioma(rng: np.random.Generator, head: _Head, hu: np.ndarray, size: int) -> np.ndarray:
    """Well-circumscribed hyperdense extra-axial dome on a broad base against the inner skull table."""
    theta = rng.uniform(0, 2 * np.pi)
    while abs(np.angle(np.exp(1j * (theta - np.pi / 2)))) < np.deg2rad(25):  # leave the skull base to the sella
        theta = rng.uniform(0, 2 * np.pi)
    anchor = head.polar(float(head.inner_table(theta)) + 0.02, theta)
    radial = rng.uniform(0.05, 0.1) * size
    outward = np.arctan2(anchor[1] - head.center_y, anchor[0] - head.center_x)
    dome = _ellipse(head, anchor, (radial, radial * rng.uniform(1.3, 1.8)), outward)
    mask = (dome < 1) & head.brain
    density = rng.uniform(50, 70) + 2.0 * _smooth_noise(rng, hu.shape, 2.0)
    hu[mask] = density[mask]
    return mask


def _pituitary(rng: np.random.Generator, head: _Head, hu: np.ndarray, size: int) -> np.ndarray:
    """Small round/oval mildly hyperdense midline mass above the sella."""
    center = head.at(rng.uniform(-0.02, 0.02), rng.uniform(0.58, 0.64))
    semi = (rng.uniform(0.04, 0.06) * size, rng.uniform(0.03, 0.045) * size)
    mask = (_ellipse(head, center, semi, head.angle + rng.uniform(-0.3, 0.3)) < 1) & head.brain
    density = rng.uniform(48, 62) + rng.uniform(0, 2) * _smooth_noise(rng, hu.shape, 1.5)
    hu[mask] = density[mask]
    return mask


_LESIONS = {"Glioma": _glioma, "Meningioma": _meningioma, "Pituitary": _pituitary}


def generate_ct_slice(rng: np.random.Generator, label: str, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One slice of class `label` (a CT_CLASSES name): (HU float32 (size, size), lesion mask bool (size, size))."""
    if label not in CT_CLASSES:
        raise ValueError(f"unknown class {label!r}; expected one of {list(CT_CLASSES)}")
    head = _place_head(rng, size)
    hu = _normal_head(rng, head, size)
    mask = _LESIONS[label](rng, head, hu, size) if label in _LESIONS else np.zeros((size, size), dtype=bool)
    hu += rng.uniform(3, 8) * rng.standard_normal(hu.shape).astype(np.float32)
    return np.maximum(hu, LOWEST_HU).astype(np.float32), mask


def generate_ct_dataset(
    n_per_class: int, seed: int | tuple[int, ...], size: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`n_per_class` slices of each class, classes interleaved: (HU (N, S, S), masks (N, S, S), labels (N,) int64).

    Labels index CT_CLASSES. The same seed (an int or a tuple of ints) always gives the same data.
    """
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(len(CT_CLASSES), dtype=np.int64), n_per_class)
    slices = [generate_ct_slice(rng, CT_CLASSES[label], size) for label in labels]
    return np.stack([hu for hu, _ in slices]), np.stack([mask for _, mask in slices]), labels


def write_ct_dicom(hu: np.ndarray, path: str | Path, patient_id: str = "P000001") -> None:
    """Write a HU slice as a CT Image Storage file (uint16 + Rescale Slope/Intercept), anonymised, without names."""
    if not re.fullmatch(get_settings().patient_id_pattern, patient_id):
        raise ValueError(f"patient id {patient_id!r} is not an anonymised id like 'P000001'")
    rows, columns = hu.shape
    stored = np.clip(np.rint(hu - LOWEST_HU), 0, np.iinfo(np.uint16).max).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.PatientID = patient_id
    ds.PatientName = ""
    ds.StudyDate = datetime.now(timezone.utc).strftime("%Y%m%d")
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SliceThickness = 5.0
    ds.KVP = 120
    ds.PixelSpacing = [FIELD_OF_VIEW_MM / rows, FIELD_OF_VIEW_MM / columns]
    ds.ImagePositionPatient = [-FIELD_OF_VIEW_MM / 2, -FIELD_OF_VIEW_MM / 2, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = LOWEST_HU, 1.0, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 80
    ds.set_pixel_data(stored, photometric_interpretation="MONOCHROME2", bits_stored=16)
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
