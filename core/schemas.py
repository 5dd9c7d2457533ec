"""Response models: SPEC.md's response shapes, written once. Every route returns one of these (or the error body)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ImportantRegion(BaseModel):
    """A box (input-image pixels) around one connected hot area of a heatmap."""

    x: int
    y: int
    width: int
    height: int
    importance: float = Field(description="mean normalised heatmap value inside the area")


class HeatmapExplanation(BaseModel):
    """A saliency map as PNG data URLs in the input image's pixel geometry, plus its hottest regions."""

    method: str = Field(description="what made the map: grad_cam, or a model-agnostic method")
    target_class: str
    layer_name: str | None = None
    colormap: str = "jet"
    heatmap_base64: str
    overlay_base64: str
    important_regions: list[ImportantRegion]


class ClassProbabilities(BaseModel):
    predicted_class: str
    confidence: float
    probabilities: dict[str, float]


class InputDescription(BaseModel):
    """What the service understood the input to be (no patient identifiers)."""

    format: str
    modality: str | None = None
    transfer_syntax: str | None = None
    photometric: str | None = None
    rows: int
    columns: int
    pixel_spacing_mm: tuple[float, float] | None = None
    sha256: str


class ResponseMetadata(BaseModel):
    timestamp: str
    processing_node: str
    input: InputDescription | None = None
    request_metadata: dict[str, Any] = Field(default_factory=dict, description="the caller's metadata, echoed")


class PredictionResponse(BaseModel):
    """The envelope every prediction route answers with."""

    success: Literal[True] = True
    request_id: str
    model_id: str
    model_version: str
    intended_use: str
    inference_time_ms: float
    warnings: list[str] = Field(default_factory=list)
    metadata: ResponseMetadata


class CTClassificationResponse(PredictionResponse):
    result: ClassProbabilities
    xai: dict[str, HeatmapExplanation] | None = None


class ModelStatus(BaseModel):
    loaded: bool
    version: str | None
    last_updated: str | None
    engine: str | None = None
    error: str | None = None
    switch_pending: str | None = Field(default=None, description=(
        "the version this replica was switched to but could not load yet (retried with backoff; `version` keeps "
        "serving meanwhile, and the replica reports degraded)"))


class ReplicaSwitch(BaseModel):
    """One replica after a model switch (`/update_model`): what it serves and whether that is the requested version."""

    replica: str = Field(description="the replica's name (`distributed.replica_id`, else its host name)")
    version: str | None = Field(description="the version it serves now (None: none loaded)")
    switched: bool = Field(description="whether it serves the requested version")
    switch_pending: str | None = Field(default=None, description=(
        "the requested version it could not load yet: retried with backoff, `error` says why"))
    error: str | None = Field(default=None, description="why its last load failed")


class HealthResponse(BaseModel):
    status: Literal["healthy", "degraded"]
    version: str
    models: dict[str, ModelStatus]
    gpu_available: bool
    gpu_devices: list[str]
    memory_usage_mb: float
    uptime_seconds: float
    dependencies: dict[str, str] = Field(default_factory=dict, description=(
        "replicas only: the shared database and volume, `ok` or why they cannot be used now (`database_unreachable`, "
        "`shared_volume_unavailable`); one that is not `ok` makes the status degraded, with HTTP 200 (the routes "
        "that do not need it still answer; `/readyz` is what takes the replica out of rotation)"))


class LiveFigures(BaseModel):
    """How a served version does in production, beside its card's held-out metrics (monitoring/live.py)."""

    predictions: dict[str, dict[str, int]] = Field(description="this replica since its start: answers by output "
                                                               "(head) and predicted class")
    ood_checks: int = Field(description="this replica since its start: inputs given an out-of-distribution check")
    ood_flagged: int
    ood_rate: float | None
    expected_ood_rate: float | None = Field(description="the share the card's calibration flags in distribution")
    drift_score: float | None = Field(description="-log10 p of the recent OOD flags against the expected rate (the "
                                                  "window of this replica's worker that checked last); alerting above 4")
    verdicts: dict[str, int] = Field(description="every clinician verdict on this version (all replicas, from the "
                                                 "feedback store)")
    agreement_rate: float | None = Field(description="accepted / all verdicts")
    reference_accuracy: float | None = Field(description="the card's held-out accuracy, where it states one")


class ModelInfo(BaseModel):
    model_id: str
    name: str
    version: str
    type: str
    input_format: list[str]
    output_classes: list[str] | dict[str, list[str]]
    metrics: dict[str, float]
    training_date: str | None
    model_size_mb: float
    avg_inference_time_ms: float | None
    xai_supported: list[str]
    intended_use: str
    input_units: dict[str, str] | None = Field(
        default=None, description="tabular models: each numeric feature's unit (a request may give another unit "
        "of the same dimension as {\"value\", \"unit\"})")
    card: dict[str, Any] = Field(description="the full model card from the store")
    live: LiveFigures | None = None


class ModelInfoResponse(BaseModel):
    models: list[ModelInfo]


class ShapFeatureImportance(BaseModel):
    """One feature's exact TreeSHAP value for the explained class, with the value the caller gave."""

    feature: str = Field(description="dotted path in the request's biomarkers object")
    importance: float = Field(description="signed contribution to the class margin (log-odds); ranked by magnitude")
    value: float | bool | str | None = Field(description="the caller's value; null when it was not given")


class ShapHeadExplanation(BaseModel):
    """Why one head predicted its class: base value + sum of importances = margin."""

    target_class: str
    margin: float = Field(description="the model's raw output (log-odds) for target_class")
    feature_importance: list[ShapFeatureImportance]


class ShapExplanation(BaseModel):
    """Exact TreeSHAP for every head's predicted class; the top-level list and plots explain `head`."""

    method: Literal["tree_shap"] = "tree_shap"
    head: str = Field(description="the head the top-level feature_importance and plots explain")
    target_class: str
    feature_importance: list[ShapFeatureImportance]
    base_values: dict[str, float] = Field(description="per head: the expected margin of its predicted class")
    heads: dict[str, ShapHeadExplanation]
    shap_plot_base64: str | None = Field(default=None, description="bar plot of the largest SHAP values (PNG data URL)")
    waterfall_plot_base64: str | None = Field(default=None, description="waterfall from base value to margin (PNG data URL)")


class MetastasisPrediction(BaseModel):
    detected: bool = Field(description="the organ head predicts an organ, not None")
    organ: ClassProbabilities
    stage: ClassProbabilities


class BiomarkerResult(BaseModel):
    """SPEC.md's result for the demo heads, plus every head of the model under `heads`."""

    tumor_type: ClassProbabilities | None = None
    metastasis: MetastasisPrediction | None = None
    heads: dict[str, ClassProbabilities]

    @classmethod
    def from_heads(cls, heads: dict[str, ClassProbabilities]) -> "BiomarkerResult":
        """Place the heads SPEC.md names (tumor_type, metastasis_organ, stage); keep all of them under `heads`."""
        organ, stage = heads.get("metastasis_organ"), heads.get("stage")
        metastasis = None
        if organ is not None and stage is not None:
            metastasis = MetastasisPrediction(detected=organ.predicted_class != "None", organ=organ, stage=stage)
        return cls(tumor_type=heads.get("tumor_type"), metastasis=metastasis, heads=heads)


class ShapOptions(BaseModel):
    model_config = ConfigDict(strict=True)  # `true`/`false` only, as declared (not 1 or "yes")

    plots: bool = Field(default=False, description="also render the bar and waterfall plots (slower)")


class BiomarkerXaiOptions(BaseModel):
    shap: ShapOptions = Field(default_factory=ShapOptions)


class BiomarkerResponse(PredictionResponse):
    result: BiomarkerResult
    xai: dict[str, ShapExplanation] | None = None


class LabelStatistics(BaseModel):
    """One segmentation label measured in the input's own voxel grid."""

    label: str
    value: int = Field(description="the label's value in the mask")
    voxel_count: int
    volume_mm3: float
    volume_ml: float
    fraction_of_tumor: float = Field(description="share of the whole tumour volume, 0-1")


class TumorVolume(BaseModel):
    """Tumour volume in mL from the input's true voxel size: the total, each label, and the BraTS regions."""

    total: float
    by_label: dict[str, float]
    regions: dict[str, float] = Field(description="WT (whole tumour), TC (tumour core), ET (enhancing tumour)")


class TumorLocation(BaseModel):
    """Tumour centroid in the input's voxel indices (x, y, z) and in RAS+ patient millimetres."""

    centroid_x: float
    centroid_y: float
    centroid_z: float
    centroid_mm: tuple[float, float, float]
    coordinate_system: Literal["RAS"] = "RAS"


class BoundingBox(BaseModel):
    """Inclusive tumour bounding box in the input's voxel indices, and the box's extent in RAS+ millimetres."""

    min_x: int
    min_y: int
    min_z: int
    max_x: int
    max_y: int
    max_z: int
    min_mm: tuple[float, float, float]
    max_mm: tuple[float, float, float]


class MaskOutput(BaseModel):
    """The label mask as a gzipped NIfTI in the input's geometry (same shape and affine: it overlays the input)."""

    format: Literal["nifti"] = "nifti"
    media_type: str = "application/gzip"
    file_name: str = "mask.nii.gz"
    data_base64: str
    shape: tuple[int, int, int]
    affine: list[list[float]]
    labels: dict[str, int] = Field(description="label name -> value in the mask")


class MaskPreview(BaseModel):
    """PNG of the axial slice with the largest tumour area, labels drawn over the reference sequence."""

    image_base64: str
    axis: int = Field(description="input voxel axis the slice is taken across")
    slice_index: int
    colors: dict[str, str]


class SequenceSourceDescription(BaseModel):
    """Which upload fed which sequence (no patient identifiers)."""

    sequence: str
    format: str
    matched_by: str
    file_name: str | None = None
    series_uid: str | None = None
    description: str | None = None
    slices: int
    transfer_syntax: str | None = None


class VolumeDescription(BaseModel):
    """What the service understood the MRI upload to be."""

    format: str
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    affine: list[list[float]]
    reference_sequence: str = Field(description="the sequence whose grid the mask is returned in")
    sequences: list[SequenceSourceDescription]
    missing_sequences: list[str]
    sha256: list[str] = Field(description="sha256 of each uploaded file, in upload order")


class VolumeMap(BaseModel):
    """A voxel map as a gzipped NIfTI in the input's geometry (same shape and affine as the mask)."""

    format: Literal["nifti"] = "nifti"
    media_type: str = "application/gzip"
    file_name: str
    data_base64: str
    shape: tuple[int, int, int]
    affine: list[list[float]]
    units: str


class VolumeInterval(BaseModel):
    """A region's volume range across the test-time-augmentation passes (widened by the card's calibrated margin)."""

    low: float
    high: float
    percentiles: tuple[float, float] = Field(description="the passes' percentiles the range starts from")
    margin: float = Field(description="share of the passes' median volume added on each side (0: uncalibrated)")


class SegmentationUncertainty(BaseModel):
    """Voxel-wise uncertainty from test-time augmentation (`uncertainty=true`)."""

    method: Literal["test_time_augmentation_flips"] = "test_time_augmentation_flips"
    passes: int = Field(description="model passes: the volume mirrored along every combination of its axes")
    measure: str = ("normalised predictive entropy of the passes' mean softmax, in percent: 0 = every pass sure of "
                    "one class, 100 = all classes equally likely")
    map: VolumeMap
    preview_base64: str = Field(description="PNG: the map over the mask preview's slice")
    axis: int
    slice_index: int
    mean_in_tumour: float | None = Field(description="mean uncertainty (0-1) over the delivered tumour voxels")
    volume_interval_ml: dict[str, VolumeInterval] = Field(description="BraTS region (WT, TC, ET) -> volume range, "
                                                                      "measured on the model grid before clean-up")
    compute_time_ms: float = Field(description="time the extra passes and the map took")


class OodCheck(BaseModel):
    """The out-of-distribution check of the input (absent when the model has no calibration)."""

    score: str
    distance: float | None = Field(description="Mahalanobis distance of the volume descriptors (None: no signal)")
    threshold: float
    flagged: bool


class SegmentationResult(BaseModel):
    tumor_detected: bool
    confidence: Literal["normal", "reduced"] = Field(
        default="normal", description="reduced when the input was out of distribution or sequences were zero-filled"
    )
    confidence_reasons: list[Literal["out_of_distribution", "sequences_zero_filled"]] = Field(default_factory=list)
    ood_check: OodCheck | None = None
    tumor_volume_ml: TumorVolume
    label_statistics: list[LabelStatistics]
    tumor_location: TumorLocation | None
    bounding_box: BoundingBox | None
    mask: MaskOutput
    mask_preview: MaskPreview | None
    dicom_seg_base64: str | None = Field(default=None, description="DICOM SEG referencing the source series")
    post_processing: dict[str, Any]
    uncertainty: SegmentationUncertainty | None = None


class SegmentationExplanation(BaseModel):
    """A Grad-CAM map of the tumour classes on the preview slice, in the input's pixel geometry."""

    method: str
    layer_name: str | None
    axis: int
    slice_index: int
    heatmap_base64: str
    overlay_base64: str
    important_regions: list[ImportantRegion]


class MRISegmentationResponse(PredictionResponse):
    task_id: str
    result: SegmentationResult
    volume: VolumeDescription
    xai: dict[str, SegmentationExplanation] | None = None


class TaskStatusResponse(BaseModel):
    """The original design's task polling body."""

    task_id: str
    status: Literal["pending", "processing", "completed", "failed", "cancelled"]
    progress: int = Field(ge=0, le=100)
    current_step: str
    estimated_remaining_seconds: float | None
    created_at: str | None = None
    completed_at: str | None = None
    failed_at: str | None = None
    cancelled_at: str | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class ExplainResponse(BaseModel):
    """Explanations computed later for an earlier prediction (`/xai/explain`)."""

    success: Literal[True] = True
    request_id: str
    model_id: str
    model_version: str
    intended_use: str
    warnings: list[str] = Field(default_factory=list)
    xai: dict[str, HeatmapExplanation]
