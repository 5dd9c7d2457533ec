"""The MRI segmentation task body: uploads -> decoded volume -> model grid -> runner -> mask in the input's
geometry -> clean-up, measurements, files. CPU-heavy steps run in threads so the worker's event loop stays free,
each under its wall-clock budget (`pipelines.budgets`); each step is reported to the task store, which also raises
TaskCancelled between steps once cancel is requested.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset

from pipelines.budgets import scaled, within_budget
from pipelines.runner_slots import ModelSlot, RunnerModel
from state.request_cache import CachedRequest, RequestCache
from pipelines.shaping import elapsed_ms, response_metadata
from core.cards.segmentation import SegmentationCard
from core.ood import OOD_WARNING
from core.schemas import (
    MaskOutput,
    MaskPreview,
    MRISegmentationResponse,
    OodCheck,
    SegmentationExplanation,
    SegmentationResult,
    SegmentationUncertainty,
    SequenceSourceDescription,
    VolumeDescription,
    VolumeInterval,
    VolumeMap,
)
from core.settings import LimitSettings
from state.tasks import TaskStates, split_ref, task_ref
from core.volume_ood import volume_descriptors, voxel_ml
from core.volumes import DecodedVolume
from monitoring import metrics
from postprocessing.dicom_results import dataset_bytes
from postprocessing.masks import (
    PostProcessingOptions,
    clean_mask,
    labels_from_probabilities,
)
from postprocessing.measurements import label_statistics, location_and_box, tumor_volume
from postprocessing.outputs import (
    LABEL_COLORS,
    AxialSlice,
    dicom_seg,
    display_plane,
    largest_tumour_slice,
    mask_nifti_gz,
    preview_png,
    unit_grey,
    volume_nifti_gz,
)
from postprocessing.uncertainty import (
    FLIPS,
    INTERVAL_PERCENTILES,
    normalised_entropy,
    pass_region_volumes,
    volume_interval,
)
from preprocessing.sequences import check_required_sequences, parse_sequence_types
from preprocessing.volumes import (
    PreparedVolume,
    Upload,
    decode_upload,
    prepare_volume,
    resample_to_grid,
)
from xai.regions import important_regions
from xai.render import DEFAULT_COLORMAP, colorize, overlay, png_data_url

GRAD_CAM = "grad_cam"
NO_SEG_WARNING = "no tumour was found, so no DICOM SEG was written"
NO_OOD_CALIBRATION_WARNING = "this model has no out-of-distribution calibration: unusual inputs are not flagged"
UNCERTAINTY_DESCRIPTION = "NeuroNova tumour uncertainty (percent)"
Report = Callable[[str], None]
"""Enters a step in the task store (blocking: the async steps call it in a thread, so the queue's heartbeat on the
event loop never waits for the database)."""


@dataclass(frozen=True)
class SegmentationRequest:
    """One segmentation request, as validated by the route; `attempt` is the run of a queued task (distributed mode)."""

    task_id: str
    request_id: str
    images: Sequence[Path]
    sequence_type: str | list[str] | None
    xai: bool
    post_processing: PostProcessingOptions
    uncertainty: bool = False
    attempt: int | None = None
    owner: str = ""
    """The submitter's token subject ("" without auth): its result is cached for that owner alone."""
    patient_id: str = ""
    """The request's pseudonymous patient id: the returned DICOM SEG's PatientID ("" from a PACS job)."""

    @property
    def ref(self) -> str:
        """How this run addresses its task in the task store and the runner (fenced by the attempt, if any)."""
        return task_ref(self.task_id, self.attempt)

    def queued_params(self) -> dict[str, Any]:
        """The parameters a queued task keeps for whichever replica runs it (the uploads travel separately)."""
        return {"request_id": self.request_id, "sequence_type": self.sequence_type, "xai": self.xai,
                "post_processing": self.post_processing.model_dump(mode="json"), "uncertainty": self.uncertainty,
                "owner": self.owner, "patient_id": self.patient_id}

    @classmethod
    def from_queued(cls, ref: str, params: dict[str, Any], images: Sequence[Path]) -> SegmentationRequest:
        """The request of one attempt of a queued task (`ref`), from `queued_params` and its uploads."""
        task_id, attempt = split_ref(ref)
        return cls(task_id=task_id, request_id=params["request_id"], images=images,
                   sequence_type=params["sequence_type"], xai=params["xai"],
                   post_processing=PostProcessingOptions(**params["post_processing"]),
                   uncertainty=params["uncertainty"], attempt=attempt, owner=params.get("owner", ""),
                   patient_id=params.get("patient_id", ""))


@dataclass(frozen=True)
class ModelOutput:
    """What the runner gave for a prepared volume: class probabilities and, on request, a Grad-CAM map (and the
    layer it was taken at) and the test-time-augmentation passes (the first is `probabilities`) with their cost."""

    probabilities: np.ndarray
    attention: np.ndarray | None = None
    attention_layer: str | None = None
    passes: np.ndarray | None = None
    passes_ms: float = 0.0


@dataclass(frozen=True)
class Segmented:
    """One finished segmentation: the response, and the decoded volume it was computed on (its sources' headers)."""

    response: MRISegmentationResponse
    volume: DecodedVolume
    prepared: PreparedVolume


async def segment_mri(
    slot: ModelSlot[SegmentationCard], tasks: TaskStates, request: SegmentationRequest, limits: LimitSettings,
) -> MRISegmentationResponse:
    """Run one segmentation of uploaded files end to end and shape the response."""
    return await SegmentationAttempt(slot, tasks, request, limits).response()


class SegmentationAttempt:
    """One attempt of an MRI task: `response` runs it; `remember` caches what `/feedback` needs of it, to be called
    only once the attempt's result was committed (`api.tasks.run_tracked`), so a superseded attempt never replaces
    the entry of the one whose mask the clinician sees."""

    def __init__(self, slot: ModelSlot[SegmentationCard], tasks: TaskStates, request: SegmentationRequest,
                 limits: LimitSettings, cache: RequestCache | None = None,
                 read: Callable[[Path], bytes] = Path.read_bytes) -> None:
        self.slot, self.tasks, self.request, self.limits, self.cache = slot, tasks, request, limits, cache
        self.read = read
        """How an upload is read (a queued task's, on the shared volume: guarded by the volume's breaker)."""
        self.segmented: Segmented | None = None

    async def response(self) -> MRISegmentationResponse:
        request = self.request
        uploads = await asyncio.to_thread(lambda: [(path.name, self.read(path)) for path in request.images])
        self.segmented = await segment_uploads(self.slot, self.tasks, request, uploads, self.limits)
        return self.segmented.response

    async def remember(self) -> None:
        segmented, cache = self.segmented, self.cache
        if segmented is not None and cache is not None:
            await asyncio.to_thread(lambda: cache.remember(cached_segmentation(
                segmented.response, segmented.volume, segmented.prepared), self.request.owner))


async def segment_series(
    slot: ModelSlot[SegmentationCard], tasks: TaskStates, request: SegmentationRequest,
    series: dict[str, Sequence[Dataset]], limits: LimitSettings,
) -> Segmented:
    """Segment series already retrieved (from a PACS), one per sequence name of the served card. The datasets go
    through the same validated decoding as uploads (written back as Part 10 files, one sequence after another), so
    a PACS's objects meet every check an upload meets."""
    uploads = await asyncio.to_thread(lambda: [
        (f"{sequence}-{index}.dcm", dataset_bytes(dataset))
        for sequence, datasets in series.items() for index, dataset in enumerate(datasets)
    ])
    return await segment_uploads(slot, tasks, replace(request, sequence_type=list(series)), uploads, limits)


@dataclass(frozen=True)
class Inferred:
    """What one pass of a task's steps on one model gave, and the generation the runner served when it ended."""

    volume: DecodedVolume
    prepared: PreparedVolume
    output: ModelOutput
    explainable: bool
    generation: int | None


async def infer_uploads(slot: ModelSlot[SegmentationCard], report: Report, request: SegmentationRequest,
                        uploads: list[Upload], limits: LimitSettings, model: RunnerModel[SegmentationCard]) -> Inferred:
    """Decode and prepare with `model`'s card, run the runner's passes; the runner's generation afterwards (the
    model's own when the runner cannot say)."""
    card = model.card
    await asyncio.to_thread(report, "decoding")  # a store call: off the event loop
    sequence_types = parse_sequence_types(request.sequence_type, card.input)
    if sequence_types is not None:
        check_required_sequences(sequence_types, card.input)
    budgets = limits.task_step_budget_seconds
    volume = await within_budget("decoding", asyncio.to_thread(decode_upload, uploads, card.input, limits,
                                                               sequence_types), budgets)
    await asyncio.to_thread(report, "preprocessing")
    prepared = await within_budget("preprocessing", asyncio.to_thread(prepare_volume, volume, card.input,
                                                                      limits.max_volume_voxels), budgets)
    await asyncio.to_thread(report, "inference")
    passes, passes_ms = None, 0.0
    if request.uncertainty:  # one model pass per mirroring: the inference budget grows with them
        passes_started = time.perf_counter()
        passes_budget = scaled(budgets, "inference", len(FLIPS))
        passes = await within_budget("inference", slot.call("segment_passes", prepared.tensor, request.ref,
                                                            retry_stale=False), passes_budget)
        probabilities, passes_ms = passes[0], elapsed_ms(passes_started)
    else:
        probabilities = await within_budget("inference", slot.call("segment", prepared.tensor, request.ref,
                                                                    retry_stale=False), budgets)
    attention = None
    layer = model.describe.get("gradcam_layer")
    explainable = layer is not None
    if request.xai and explainable:
        await asyncio.to_thread(report, "explaining")
        attention = await within_budget("explaining", slot.call("explain", prepared.tensor, request.ref,
                                                                retry_stale=False), budgets)
    generation = await slot.generation_now()
    return Inferred(volume, prepared, ModelOutput(probabilities, attention, layer, passes, passes_ms), explainable,
                    generation if generation is not None else model.describe.get("generation"))


async def segment_uploads(
    slot: ModelSlot[SegmentationCard], tasks: TaskStates, request: SegmentationRequest, uploads: list[Upload],
    limits: LimitSettings,
) -> Segmented:
    """Decode, prepare, run (with the requested extras) and measure; each step reported to the task store. A model
    switched while the steps ran (they may then have run on different versions) runs them again on the new model
    (`ModelSlot.on_served_model`), so the result names the one model that computed all of it."""
    started = time.perf_counter()

    def report(step: str) -> None:
        tasks.report(request.ref, step)

    model, inferred = await slot.on_served_model(
        lambda model: infer_uploads(slot, report, request, uploads, limits, model), lambda out: out.generation)
    card, volume, prepared = model.card, inferred.volume, inferred.prepared
    await asyncio.to_thread(report, "postprocessing")
    result, explanation = await within_budget("postprocessing", asyncio.to_thread(
        build_result, volume, prepared, inferred.output, card, request.post_processing, model.tag, report,
        request.patient_id,
    ), limits.task_step_budget_seconds)
    warnings = [zero_filled_warning(s) for s in prepared.missing_sequences]
    if result.ood_check is None:
        warnings.append(NO_OOD_CALIBRATION_WARNING)
    elif result.ood_check.flagged:
        warnings.append(OOD_WARNING)
    if volume.format == "dicom" and result.dicom_seg_base64 is None:
        warnings.append(NO_SEG_WARNING)
    if request.xai and not inferred.explainable:
        warnings.append("this model has no differentiable weights, so no Grad-CAM map was made")
    described = await asyncio.to_thread(describe_volume, volume, prepared, uploads)
    response = MRISegmentationResponse(
        request_id=request.request_id, task_id=request.task_id, model_id=slot.model_id, model_version=model.tag,
        intended_use=card.intended_use, inference_time_ms=elapsed_ms(started), warnings=warnings,
        result=result, volume=described,
        xai={GRAD_CAM: explanation} if explanation is not None else None, metadata=response_metadata(),
    )
    monitor_segmentation(slot.model_id, model.tag, card, volume, result)
    return Segmented(response, volume, prepared)


def monitor_segmentation(model_id: str, tag: str, card: SegmentationCard, volume: DecodedVolume,
                         result: SegmentationResult) -> None:
    """Report the answer, its input, its OOD check and its confidence to the per-version metrics (monitoring/)."""
    metrics.observe_model(model_id, tag, None)
    metrics.observe_prediction(model_id, tag, "tumour", "detected" if result.tumor_detected else "not_detected")
    metrics.observe_image(model_id, tag, volume.format, None, (), volume.shape, volume.spacing)
    check = result.ood_check
    if check is not None and card.ood is not None:
        relative = check.distance / check.threshold if check.distance is not None else math.inf
        metrics.observe_ood(model_id, tag, relative, check.flagged, card.ood.coverage)
    metrics.observe_segmentation(model_id, tag, result.confidence,
                                 result.uncertainty.mean_in_tumour if result.uncertainty is not None else None)


def cached_segmentation(response: MRISegmentationResponse, volume: DecodedVolume, prepared: PreparedVolume) -> CachedRequest:
    """What `/feedback` needs of a segmentation later: the de-identified model input as float16 (clipped to its range;
    three significant digits of z-scored intensities are plenty for fine-tuning) with its model-grid affine, the mask and
    the input's affine (the grid a corrected mask comes back on), the mask's label values, and the uploads' hash (one
    file: its sha256; several: the sha256 of their sha256s, newline-joined in upload order)."""
    largest = float(np.finfo(np.float16).max)
    hashes = response.volume.sha256
    input_sha256 = hashes[0] if len(hashes) == 1 else hashlib.sha256("\n".join(hashes).encode()).hexdigest()
    mask = response.result.mask
    return CachedRequest(
        request_id=response.request_id, model_id=response.model_id, model_version=response.model_version,
        input_sha256=input_sha256,
        arrays={"tensor": np.clip(prepared.tensor, -largest, largest).astype(np.float16), "affine": prepared.affine,
                "mask": delivered_volume(mask), "input_affine": volume.affine},
        facts={"mask_labels": mask.labels},
    )


def delivered_volume(volume: MaskOutput | VolumeMap) -> np.ndarray:
    """A volume exactly as the response delivers it (the mask's uint8 labels, a map's values; input grid)."""
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(volume.data_base64))).dataobj)


def build_result(
    volume: DecodedVolume, prepared: PreparedVolume, output: ModelOutput, card: SegmentationCard,
    options: PostProcessingOptions, model_tag: str, report: Report, patient_id: str = "",
) -> tuple[SegmentationResult, SegmentationExplanation | None]:
    """Mask in the input's geometry, cleaned and measured, with its files (and the Grad-CAM slice on request); the
    DICOM SEG de-identified, its PatientID `patient_id` (the request's pseudonym)."""
    in_input = resample_to_grid(output.probabilities.astype(np.float32), prepared.affine, volume.affine, volume.shape,
                                "bilinear")
    labels = clean_mask(labels_from_probabilities(in_input, card.channel_values()), options)
    ood_check = check_ood(prepared, output.probabilities, card)
    reasons = (["out_of_distribution"] if ood_check is not None and ood_check.flagged else []) + \
        (["sequences_zero_filled"] if prepared.missing_sequences else [])
    statistics = label_statistics(labels, volume.affine, card)
    located = location_and_box(labels, volume.affine)
    report("writing_outputs")
    reference = volume.data[volume.sequences.index(volume.reference_sequence)]
    axial = largest_tumour_slice(reference, labels, volume.affine)
    seg = None
    if volume.format == "dicom" and located is not None:
        seg = base64.b64encode(dicom_seg(labels, volume.source_of(volume.reference_sequence), card, model_tag,
                                         patient_id=patient_id)).decode()
    result = SegmentationResult(
        tumor_detected=located is not None, confidence="reduced" if reasons else "normal", confidence_reasons=reasons,
        ood_check=ood_check, tumor_volume_ml=tumor_volume(statistics, card), label_statistics=statistics,
        tumor_location=located[0] if located else None, bounding_box=located[1] if located else None,
        mask=MaskOutput(
            data_base64=base64.b64encode(mask_nifti_gz(labels, volume.affine)).decode(), shape=volume.shape,
            affine=np.round(volume.affine, 6).tolist(), labels={label.name: label.value for label in card.labels},
        ),
        mask_preview=MaskPreview(
            image_base64=preview_png(axial, card), axis=axial.axis, slice_index=axial.index,
            colors={name: "#{:02x}{:02x}{:02x}".format(*color) for name, color in LABEL_COLORS.items()},
        ),
        dicom_seg_base64=seg, post_processing=options.model_dump(),
        uncertainty=None if output.passes is None else
        uncertainty_result(output, prepared, volume, labels, axial, card),
    )
    explanation = None
    if output.attention is not None:
        attention = resample_to_grid(output.attention[None], prepared.affine, volume.affine, volume.shape, "bilinear")[0]
        explanation = explanation_on_slice(attention, volume.affine, axial, output.attention_layer)
    return result, explanation


def zero_filled_warning(sequence: str) -> str:
    return (f"sequence {sequence} was not sent: the model ran with it zero-filled, as its card allows; "
            "confidence is reduced")


def check_ood(prepared: PreparedVolume, probabilities: np.ndarray, card: SegmentationCard) -> OodCheck | None:
    """The model's out-of-distribution check of this input (None when its card has no calibration)."""
    if card.ood is None:
        return None
    descriptors = volume_descriptors(prepared.tensor, probabilities, voxel_ml(prepared.affine))
    distance = card.ood.distance(descriptors)
    return OodCheck(score=card.ood.score, distance=round(distance, 4) if np.isfinite(distance) else None,
                    threshold=round(card.ood.threshold, 4), flagged=card.ood.flags(descriptors))


def uncertainty_result(
    output: ModelOutput, prepared: PreparedVolume, volume: DecodedVolume, labels: np.ndarray, axial: AxialSlice,
    card: SegmentationCard,
) -> SegmentationUncertainty:
    """The uncertainty map on the input grid (NIfTI, percent), its preview on the mask's slice, and volume ranges."""
    started = time.perf_counter()
    on_model_grid = normalised_entropy(output.passes)
    in_input = np.clip(resample_to_grid(on_model_grid[None], prepared.affine, volume.affine, volume.shape,
                                        "bilinear")[0], 0.0, 1.0)
    plane = display_plane(in_input, volume.affine, axial.axis, axial.index)
    margins = card.volume_interval.margins if card.volume_interval is not None else {}
    intervals = {}
    for region, volumes in pass_region_volumes(output.passes, card, voxel_ml(prepared.affine)).items():
        low, high = volume_interval(volumes, margins.get(region, 0.0))
        intervals[region] = VolumeInterval(low=round(low, 2), high=round(high, 2), percentiles=INTERVAL_PERCENTILES,
                                           margin=margins.get(region, 0.0))
    tumour = labels > 0
    percent = np.round(in_input * 100.0).astype(np.uint8)
    return SegmentationUncertainty(
        passes=len(output.passes),
        map=VolumeMap(file_name="uncertainty.nii.gz", units="percent",
                      data_base64=base64.b64encode(volume_nifti_gz(percent, volume.affine, UNCERTAINTY_DESCRIPTION))
                      .decode(), shape=volume.shape, affine=np.round(volume.affine, 6).tolist()),
        preview_base64=png_data_url(overlay(unit_grey(axial.image), plane, DEFAULT_COLORMAP)),
        axis=axial.axis, slice_index=axial.index,
        mean_in_tumour=round(float(in_input[tumour].mean()), 4) if tumour.any() else None,
        volume_interval_ml=intervals,
        compute_time_ms=round(output.passes_ms + elapsed_ms(started), 1),
    )


def explanation_on_slice(
    attention: np.ndarray, affine: np.ndarray, axial: AxialSlice, layer_name: str | None
) -> SegmentationExplanation:
    """The Grad-CAM map on the preview slice, as heatmap and overlay PNGs with its hottest regions."""
    heatmap = np.clip(display_plane(attention, affine, axial.axis, axial.index), 0.0, 1.0)
    return SegmentationExplanation(
        method=GRAD_CAM, layer_name=layer_name, axis=axial.axis,
        slice_index=axial.index, heatmap_base64=png_data_url(colorize(heatmap, DEFAULT_COLORMAP)),
        overlay_base64=png_data_url(overlay(unit_grey(axial.image), heatmap, DEFAULT_COLORMAP)),
        important_regions=important_regions(heatmap),
    )


def describe_volume(volume: DecodedVolume, prepared: PreparedVolume, uploads: Sequence[tuple[str, bytes]]) -> VolumeDescription:
    """What the service understood the upload to be, with which series fed which sequence (no identifiers)."""
    return VolumeDescription(
        format=volume.format, shape=volume.shape, spacing_mm=tuple(round(s, 4) for s in volume.spacing),
        affine=np.round(volume.affine, 6).tolist(), reference_sequence=volume.reference_sequence,
        sequences=[
            SequenceSourceDescription(sequence=s.sequence, format=s.format, matched_by=s.matched_by,
                                      series_uid=s.series_uid, description=s.description, slices=s.slices,
                                      transfer_syntax=s.transfer_syntax)
            for s in volume.sources
        ],
        missing_sequences=list(prepared.missing_sequences),
        sha256=[hashlib.sha256(data).hexdigest() for _, data in uploads],
    )
