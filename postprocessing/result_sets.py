"""What one model run stores into the study: the result objects a PACS rule asks for (`ModelRules.results`), built
in store order (a report after what it references).

| model | object | what it is | default |
| --- | --- | --- | --- |
| mri_segmentation | `segmentation` | DICOM SEG of the tumour labels on the source series | yes |
| mri_segmentation | `measurement_report` | TID 1500 SR: each segment's volume, referencing it | yes |
| mri_segmentation | `uncertainty_map` | Parametric Map of the voxel uncertainty (runs the mirrored passes) | no |
| ct_classification | `overlay_capture` | RGB Secondary Capture of the heatmap over the slice | yes |
| ct_classification | `heatmap_map` | Parametric Map of the heatmap on the source instance | yes |
| ct_classification | `probability_report` | TID 1500 SR: each class's probability on the source instance | yes |

An MR run that finds no tumour writes its negative report (`dicom_results.mr_negative_report`) whatever the rule
lists: a study is never left without an answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from core.cards.classification import ClassificationCard
from core.cards.segmentation import SegmentationCard
from core.volumes import SeriesSource
from postprocessing.dicom_results import (
    ct_overlay_capture,
    ct_probability_report,
    mr_measurement_report,
    mr_segmentation,
)
from postprocessing.parametric_maps import ct_heatmap_map, mr_uncertainty_map
from xai.render import overlay

ResultObject = Literal["segmentation", "measurement_report", "uncertainty_map", "overlay_capture", "heatmap_map",
                       "probability_report"]
OBJECTS_OF_MODEL: dict[str, tuple[ResultObject, ...]] = {
    "mri_segmentation": ("segmentation", "measurement_report", "uncertainty_map"),
    "ct_classification": ("overlay_capture", "heatmap_map", "probability_report"),
}
"""Every object a model's run can write, in store order."""
DEFAULT_OBJECTS: dict[str, tuple[ResultObject, ...]] = {
    "mri_segmentation": ("segmentation", "measurement_report"),
    "ct_classification": ("overlay_capture", "heatmap_map", "probability_report"),
}
METHOD_NAMES = {"grad_cam": "Grad-CAM", "occlusion": "Occlusion"}
"""The CT route's explanation methods as viewers list them."""


@dataclass(frozen=True)
class ResultSet:
    """What one model run stores into the study, in store order, and what of it a viewer ignoring SR shows."""

    objects: tuple[hd.SOPClass, ...]

    @property
    def shown_without_sr(self) -> list[hd.SOPClass]:
        return shown_without_sr(self.objects)


def shown_without_sr(objects: Sequence[Dataset]) -> list[Dataset]:
    """What a viewer that ignores SR still shows of a result set: every object but the reports.

    CT: the Secondary Capture of the overlay and the heatmap's Parametric Map. MR: the DICOM SEG itself, which viewers
    such as OHIF draw over the source series, and the uncertainty map; the volumes live in the SR only, as a viewer
    computes them from the SEG anyway.
    """
    return [ds for ds in objects if ds.Modality != "SR"]


def checked_objects(model_id: str, objects: Sequence[ResultObject] | None) -> tuple[ResultObject, ...]:
    """`objects` (None: the model's default) in store order; ValueError for none, for an object the model cannot
    write, or for a measurement report without the segmentation it references."""
    if objects is None:
        return DEFAULT_OBJECTS[model_id]
    foreign = sorted(set(objects) - set(OBJECTS_OF_MODEL[model_id]))
    if foreign:
        raise ValueError(f"{model_id} writes {', '.join(OBJECTS_OF_MODEL[model_id])}, not {', '.join(foreign)}")
    if not objects:
        raise ValueError("results must name at least one object")
    if "measurement_report" in objects and "segmentation" not in objects:
        raise ValueError("the measurement_report references the segmentation: list both")
    return tuple(kind for kind in OBJECTS_OF_MODEL[model_id] if kind in objects)


def ct_results(source: Dataset, display: np.ndarray, heatmap: np.ndarray, method: str,
               probabilities: dict[str, float], predicted: str, card: ClassificationCard, model_tag: str, *,
               objects: Sequence[ResultObject] | None = None, uid_key: str | None = None) -> ResultSet:
    """The CT objects named in `objects` (default: all three). `display` is the slice as the CT route shows it and
    `heatmap` its `method` map (e.g. "grad_cam") of the `predicted` class, both [0, 1] on the source's grid
    (`xai.render.to_source_geometry`); the capture's description names the predicted class and its probability.
    `uid_key`: see `dicom_results.result_uid`."""
    finding = f"{predicted} {probabilities[predicted]:.0%}" if predicted in probabilities else None
    name = METHOD_NAMES.get(method, method)
    build = {
        "overlay_capture": lambda: ct_overlay_capture(source, overlay(display, heatmap), card, model_tag,
                                                      method=name, finding=finding, uid_key=uid_key),
        "heatmap_map": lambda: ct_heatmap_map(source, heatmap, card, model_tag, method=name,
                                              explained_class=predicted, uid_key=uid_key),
        "probability_report": lambda: ct_probability_report(source, probabilities, predicted, card, model_tag,
                                                            uid_key=uid_key),
    }
    return ResultSet(tuple(build[kind]() for kind in checked_objects(card.task, objects)))


def mr_results(labels: np.ndarray, source: SeriesSource, volumes_ml: dict[str, float], card: SegmentationCard,
               model_tag: str, *, uncertainty: np.ndarray | None = None,
               objects: Sequence[ResultObject] | None = None, uid_key: str | None = None) -> ResultSet:
    """The MR objects named in `objects` (default: the SEG and its measurement report) on the reference series
    `source`: `labels` and `uncertainty` (0..1; None when the run made none, and then no map) on its grid (see
    `dicom_results.mr_segmentation`); `volumes_ml` per segment label (`dicom_results.segment_volumes_ml`).
    `uid_key`: see `dicom_results.result_uid`."""
    wanted = checked_objects(card.task, objects)
    built: list[hd.SOPClass] = []
    if "segmentation" in wanted:
        built.append(mr_segmentation(labels, source, card, model_tag, uid_key=uid_key))
    if "measurement_report" in wanted:
        built.append(mr_measurement_report(built[0], list(source.headers), volumes_ml, card, model_tag,
                                           uid_key=uid_key))
    if "uncertainty_map" in wanted and uncertainty is not None:
        built.append(mr_uncertainty_map(uncertainty, source, card, model_tag, uid_key=uid_key))
    return ResultSet(tuple(built))
