"""Result maps as DICOM Parametric Maps, built with highdicom: data a viewer overlays on the source image, windows and
switches off (OHIF 3.9+ shows Parametric Maps over their source), not a burnt-in picture.

- `ct_heatmap_map`: the CT explanation heatmap (Grad-CAM or occlusion, 0..1) on the source instance's grid.
- `mr_uncertainty_map`: the MRI voxel uncertainty (normalised predictive entropy, 0..1) on the source series' grid.

Each map stores its 0..1 values as 32-bit floats with an identity Real World Value Mapping (unit "1", no
dimension): what OHIF's Parametric Map loader (cornerstone's `adaptersPMAP`, 32-bit data only) reads, and it ignores
the mapping. A multi-frame map's frames are in the order OHIF lays them on the source volume (cornerstone sorts the
volume's images by ascending position along row x column cosines, and the loader takes the frames in file order),
each frame still naming its source instance and position. The model is named the way every result object names it
(`ModelIdentity.equipment`: Manufacturer, ManufacturerModelName = model id, SoftwareVersions = model tag, a
Contributing Equipment item with the model's name), and its tag ends the map's ContentDescription.
"""

from __future__ import annotations

import re

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from core.cards.classification import ClassificationCard
from core.cards.segmentation import SegmentationCard
from core.volumes import SeriesSource
from postprocessing.dicom_results import ModelIdentity, result_uid, study_reference

CT_HEATMAP_SERIES_NUMBER, MR_UNCERTAINTY_SERIES_NUMBER = 9905, 9906
_LO = 64
"""Longest DICOM LO (Long String) value."""
_GEOMETRY = ("FrameOfReferenceUID", "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")


def ct_heatmap_map(source: Dataset, heatmap: np.ndarray, card: ClassificationCard, model_tag: str, *,
                   method: str, explained_class: str, uid_key: str | None = None) -> hd.pm.ParametricMap:
    """The explanation heatmap of `explained_class` as a one-frame Parametric Map on the source CT instance.

    `heatmap` is float rows x columns in [0, 1] on the source's pixel grid (`xai.render.to_source_geometry`).
    The source must carry its plane geometry (frame of reference, orientation, position, pixel spacing): the map is
    placed on it.
    `uid_key`: see `dicom_results.result_uid`.
    """
    shape = (source.get("Rows"), source.get("Columns"))
    if heatmap.ndim != 2 or heatmap.shape != shape:
        raise ValueError(f"the heatmap must be on the source grid {shape}, not {heatmap.shape}")
    _require_geometry(source)
    identity = ModelIdentity.of(card, model_tag)
    what = f"{method} of {explained_class}"
    return _parametric_map([study_reference(source)], heatmap[None], identity, label=method, what=what,
                           series_number=CT_HEATMAP_SERIES_NUMBER, uid_parts=("ct-heatmap", method), uid_key=uid_key)


def mr_uncertainty_map(uncertainty: np.ndarray, source: SeriesSource, card: SegmentationCard, model_tag: str, *,
                       uid_key: str | None = None) -> hd.pm.ParametricMap:
    """The voxel uncertainty as a Parametric Map with one frame per slice of the source series.

    `uncertainty` is float in [0, 1] on the series' own grid, like the SEG's labels (`dicom_results.mr_segmentation`):
    x = column, y = row, z = the series' slices in `source.headers` order. `uid_key`: see `dicom_results.result_uid`.
    """
    headers = [study_reference(header) for header in source.headers]
    if not headers:
        raise ValueError("an uncertainty map needs the DICOM series the model read")
    for header in headers:
        _require_geometry(header)
    identity = ModelIdentity.of(card, model_tag)
    return _parametric_map(headers, np.transpose(uncertainty, (2, 1, 0)), identity, label="Uncertainty",
                           what="normalised entropy", series_number=MR_UNCERTAINTY_SERIES_NUMBER,
                           uid_parts=("mr-uncertainty",), uid_key=uid_key)


def _parametric_map(sources: list[Dataset], frames: np.ndarray, identity: ModelIdentity, *, label: str, what: str,
                    series_number: int, uid_parts: tuple[str, ...], uid_key: str | None) -> hd.pm.ParametricMap:
    """`frames` (frames x rows x columns, [0, 1]) on `sources` (one per frame, or one for a single frame), labelled
    `label` (e.g. "Grad-CAM"), described as `what` (e.g. "Grad-CAM of Glioma") with the model's tag."""
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=label[:16], lut_explanation=f"{what}, 0 to 1"[:_LO], unit=codes.UCUM.NoUnits,
        value_range=(0.0, 1.0), slope=1.0, intercept=0.0,
    )
    parametric_map = hd.pm.ParametricMap(
        source_images=sources, pixel_array=np.ascontiguousarray(np.clip(frames, 0.0, 1.0), dtype=np.float32),
        series_instance_uid=result_uid(uid_key, *uid_parts, "series"), series_number=series_number,
        sop_instance_uid=result_uid(uid_key, *uid_parts, "instance"), instance_number=1,
        contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label=re.sub(r"[^A-Z0-9_]", "_", label.upper())[:16],
        content_description=f"{what} by {identity.model_tag}"[:_LO],
        **identity.equipment(what),
    )
    # General Series Laterality (type 2C), as on the overlay capture (`dicom_results.ct_overlay_capture`).
    parametric_map.Laterality = sources[0].get("Laterality", "")
    return in_viewer_order(parametric_map)


def in_viewer_order(parametric_map: hd.pm.ParametricMap) -> hd.pm.ParametricMap:
    """The map with its frames (pixels and per-frame groups together) by ascending position along the normal of its
    plane orientation (row x column cosines): the order OHIF lays a map's frames on the source volume in
    (`sortImageIdsAndGetSpacing` of cornerstone; highdicom writes them the other way round)."""
    frames = parametric_map.PerFrameFunctionalGroupsSequence
    if len(frames) < 2:
        return parametric_map
    cosines = np.asarray(parametric_map.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                         .ImageOrientationPatient, dtype=float)
    normal = np.cross(cosines[:3], cosines[3:])
    distances = [float(np.dot(normal, np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float)))
                 for frame in frames]
    order = np.argsort(distances, kind="stable")
    pixels = np.frombuffer(parametric_map.FloatPixelData, dtype="<f4").reshape(len(frames), -1)
    parametric_map.FloatPixelData = np.ascontiguousarray(pixels[order]).tobytes()
    parametric_map.PerFrameFunctionalGroupsSequence = [frames[index] for index in order]
    return parametric_map


def missing_geometry(header: Dataset) -> list[str]:
    """The plane-geometry attributes a map needs that the source image lacks (none: a map can be placed on it)."""
    return [keyword for keyword in _GEOMETRY if keyword not in header]


def _require_geometry(header: Dataset) -> None:
    missing = missing_geometry(header)
    if missing:
        raise ValueError(f"the source image has no {', '.join(missing)}: a map cannot be placed on it")
