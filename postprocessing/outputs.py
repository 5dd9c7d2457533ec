"""Files returned with a segmentation: the mask as gzipped NIfTI, a PNG preview slice, and a DICOM SEG."""

from __future__ import annotations

import gzip
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, io_orientation

from core.cards.segmentation import ENHANCING, NECROTIC_CORE, OEDEMA, SegmentationCard
from core.settings import get_settings
from core.volumes import SeriesSource
from postprocessing.deidentification import Deidentification
from postprocessing.dicom_results import dataset_bytes, mr_segmentation
from xai.render import png_data_url

LABEL_COLORS: dict[str, tuple[int, int, int]] = {
    NECROTIC_CORE: (230, 40, 40), OEDEMA: (40, 200, 60), ENHANCING: (250, 220, 30),
}
"""The usual BraTS colours: necrotic core red, oedema green, enhancing tumour yellow."""
PREVIEW_ALPHA = 0.5
_DISPLAY_PERCENTILES = (0.5, 99.5)
_SCANNER_XFORM = 1


@dataclass(frozen=True)
class AxialSlice:
    """The preview slice: its index along input voxel `axis`, and the image/mask slice in radiological display
    orientation (anterior up, patient's right on the viewer's left)."""

    axis: int
    index: int
    image: np.ndarray
    labels: np.ndarray


def mask_nifti_gz(labels: np.ndarray, affine: np.ndarray) -> bytes:
    """The uint8 mask as a gzipped NIfTI-1 with the input's affine as both sform and qform."""
    return volume_nifti_gz(labels, affine, "NeuroNova tumour mask")


def volume_nifti_gz(values: np.ndarray, affine: np.ndarray, description: str) -> bytes:
    """A uint8 volume (mask, uncertainty in percent) as a gzipped NIfTI-1 with `affine` as both sform and qform."""
    image = nib.Nifti1Image(values.astype(np.uint8), affine)
    image.set_sform(affine, code=_SCANNER_XFORM)
    image.set_qform(affine, code=_SCANNER_XFORM)
    image.header["descrip"] = description.encode()[:79]
    return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)


def axial_axis(affine: np.ndarray) -> int:
    """The input voxel axis that runs along the patient's inferior-superior direction (nibabel's orientation)."""
    return int(np.flatnonzero(io_orientation(affine)[:, 0] == 2)[0])


def display_plane(volume: np.ndarray, affine: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Slice `index` across `axis` in radiological display orientation (anterior up, patient's right on the left)."""
    as_ras = apply_orientation(np.take(volume, [index], axis=axis), io_orientation(affine))
    return np.flip(np.squeeze(as_ras, axis=2).T, axis=(0, 1))


def largest_tumour_slice(image: np.ndarray, labels: np.ndarray, affine: np.ndarray) -> AxialSlice:
    """The axial slice with the largest tumour area (the middle slice without tumour), in display orientation."""
    axis = axial_axis(affine)
    areas = np.moveaxis(labels > 0, axis, 0).reshape(labels.shape[axis], -1).sum(axis=1)
    index = int(np.argmax(areas)) if areas.max() > 0 else labels.shape[axis] // 2
    return AxialSlice(axis=axis, index=index, image=display_plane(image, affine, axis, index),
                      labels=display_plane(labels, affine, axis, index))


def preview_png(axial: AxialSlice, card: SegmentationCard) -> str:
    """The reference sequence (percentile-windowed grey) with the labels drawn over it, as a PNG data URL."""
    grey = unit_grey(axial.image)
    rgb = np.repeat(grey[..., None] * 255.0, 3, axis=-1)
    for label in card.tumor_labels():
        inside = axial.labels == label.value
        rgb[inside] = (1 - PREVIEW_ALPHA) * rgb[inside] + PREVIEW_ALPHA * np.asarray(LABEL_COLORS[label.name])
    return png_data_url(rgb.astype(np.uint8))


def unit_grey(plane: np.ndarray) -> np.ndarray:
    """Percentile window of the non-zero pixels onto [0, 1]."""
    values = plane[plane != 0]
    if values.size == 0:
        return np.zeros(plane.shape, dtype=np.float32)
    low, high = np.percentile(values, _DISPLAY_PERCENTILES)
    return np.clip((plane - low) / max(float(high - low), 1e-6), 0.0, 1.0).astype(np.float32)


def dicom_seg(labels: np.ndarray, source: SeriesSource, card: SegmentationCard, model_tag: str, *,
              patient_id: str | None = None) -> bytes:
    """The binary DICOM SEG of the tumour labels present (`dicom_results.mr_segmentation`) as a Part 10 file,
    de-identified as configured (`postprocessing.deidentification`), its PatientID the request's `patient_id`."""
    profile = Deidentification.of(get_settings().deidentification, patient_id)
    return dataset_bytes(mr_segmentation(labels, source, card, model_tag, reference=profile.reference))
