"""Card of a 3D multi-sequence MRI segmenter (the `mri_segmentation` route): input preparation, labels, inference."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.cards.base import CardBase, ModelFileName
from core.volume_ood import VolumeOodCalibration

MRI_SEQUENCES: tuple[str, ...] = ("T1", "T1ce", "T2", "FLAIR")
NECROTIC_CORE, OEDEMA, ENHANCING = "necrotic_core", "oedema", "enhancing_tumor"
TUMOR_LABEL_NAMES: tuple[str, ...] = (NECROTIC_CORE, OEDEMA, ENHANCING)
REGION_LABELS: dict[str, tuple[str, ...]] = {
    "WT": (NECROTIC_CORE, OEDEMA, ENHANCING),
    "TC": (NECROTIC_CORE, ENHANCING),
    "ET": (ENHANCING,),
}
"""BraTS evaluation regions: whole tumour, tumour core, enhancing tumour."""


AcquisitionTag = Literal["RepetitionTime", "EchoTime", "InversionTime"]
NO_UPPER_BOUND = 1e9


class SequenceRule(BaseModel):
    """How a DICOM series or a file is recognised as one sequence.

    A series matches when its SeriesDescription / ProtocolName (or a file's name / NIfTI description) matches
    `description_pattern` (case-insensitive regex search), or, failing every description, when each acquisition tag
    in `tag_ranges` lies in its [low, high] range (ms) and the contrast agent condition holds.
    """

    model_config = ConfigDict(extra="forbid")

    sequence: str
    description_pattern: str
    tag_ranges: dict[AcquisitionTag, tuple[float, float]] = Field(default_factory=dict)
    contrast: Literal["any", "with", "without"] = "any"


def default_sequence_rules() -> list[SequenceRule]:
    """Rules for the usual names and acquisition parameters of the four BraTS sequences, most specific first."""
    return [
        SequenceRule(sequence="FLAIR", description_pattern=r"flair|dark[\s_-]?fluid",
                     tag_ranges={"InversionTime": (1500, NO_UPPER_BOUND), "RepetitionTime": (4000, NO_UPPER_BOUND)}),
        SequenceRule(sequence="T1ce", description_pattern=r"t1[\s_-]*(ce|c\b|gd|post|\+\s*c|contrast)|"
                     r"(post|gad|gd)[\s_-]*(contrast|t1)", tag_ranges={"RepetitionTime": (0, 2500), "EchoTime": (0, 30)},
                     contrast="with"),
        SequenceRule(sequence="T1", description_pattern=r"t1(?![\s_-]*(ce|c\b|gd|post|\+))|mprage|spgr",
                     tag_ranges={"RepetitionTime": (0, 2500), "EchoTime": (0, 30)}, contrast="without"),
        SequenceRule(sequence="T2", description_pattern=r"t2(?![\s_-]*(flair|\*|star))",
                     tag_ranges={"RepetitionTime": (2000, NO_UPPER_BOUND), "EchoTime": (60, NO_UPPER_BOUND)}),
    ]


class VolumeInputSpec(BaseModel):
    """Everything preprocessing needs to turn decoded MRI sequences into this model's input tensor."""

    model_config = ConfigDict(extra="forbid")

    sequences: list[str] = Field(default_factory=lambda: list(MRI_SEQUENCES), description="input channels, in order")
    optional_sequences: list[str] = Field(
        default_factory=list,
        description="sequences that may be missing (zero-filled after normalisation, the response then says so and "
                    "lowers its confidence); every other sequence is required. Default: none, all are required",
    )
    sequence_dropout: float | None = Field(
        default=None, ge=0, lt=1,
        description="probability with which training zeroed some sequences of a case, so the model learnt to work "
                    "without them (0: never; None: not stated). A card with optional sequences cannot say 0",
    )
    target_spacing_mm: tuple[float, float, float] = Field(default=(2.0, 2.0, 2.0), description="model voxel size")
    orientation: Literal["RAS"] = "RAS"
    normalisation: Literal["zscore_nonzero"] = Field(
        default="zscore_nonzero", description="per channel: (x - mean) / std over the non-zero voxels (BraTS style)"
    )
    sequence_rules: list[SequenceRule] = Field(default_factory=default_sequence_rules)
    modalities: list[str] = Field(default_factory=lambda: ["MR"], description="DICOM modalities accepted")

    @model_validator(mode="after")
    def _sequences_consistent(self) -> VolumeInputSpec:
        if len(set(self.sequences)) != len(self.sequences):
            raise ValueError("sequences must be unique")
        unknown = (set(self.optional_sequences) | {rule.sequence for rule in self.sequence_rules}) - set(self.sequences)
        if unknown:
            raise ValueError(f"optional sequences and rules name unknown sequences {sorted(unknown)}")
        if self.optional_sequences and self.sequence_dropout == 0:
            raise ValueError("a model trained without sequence dropout cannot have optional sequences")
        if any(s <= 0 for s in self.target_spacing_mm):
            raise ValueError("target spacing must be positive")
        return self

    def required_sequences(self) -> list[str]:
        return [s for s in self.sequences if s not in self.optional_sequences]


class SegmentationLabel(BaseModel):
    """One output class: the model's output channel, the label value written in masks, and its contract name."""

    model_config = ConfigDict(extra="forbid")

    channel: int = Field(ge=0)
    value: int = Field(ge=0, le=255)
    name: Literal["background", "necrotic_core", "oedema", "enhancing_tumor"]


class SlidingWindowSpec(BaseModel):
    """MONAI sliding-window inference settings."""

    model_config = ConfigDict(extra="forbid")

    roi_size: tuple[int, int, int] = (64, 64, 64)
    overlap: float = Field(default=0.25, ge=0, lt=1)
    sw_batch_size: int = Field(default=4, ge=1, le=64)
    mode: Literal["gaussian", "constant"] = "gaussian"


class SegmentationArchitecture(BaseModel):
    """How to rebuild the torch module stored beside the ONNX file (GPU serving, attention / Grad-CAM maps)."""

    model_config = ConfigDict(extra="forbid")

    factory: Literal["monai.SegResNet"] = "monai.SegResNet"
    kwargs: dict = Field(default_factory=dict)
    weights_file: ModelFileName = "model.pt"
    gradcam_layer: str = Field(default="up_layers.1", description="decoder block the attention map is taken from")

    def size_multiple(self) -> int:
        """Whole-volume passes need sides divisible by this: SegResNet halves the resolution once per level after
        the first (MONAI's default has four levels)."""
        return 2 ** (len(self.kwargs.get("blocks_down", (1, 2, 2, 4))) - 1)


class VolumeIntervalCalibration(BaseModel):
    """How much the test-time-augmentation volume spread is widened to cover the true volume (postprocessing.uncertainty)."""

    model_config = ConfigDict(extra="forbid")

    margins: dict[str, float] = Field(
        description="BraTS region -> what is added below and above its interval, as a share of the passes' median volume"
    )
    coverage: float = Field(gt=0, lt=100, description="percent of calibration cases the widened interval must cover")
    n_cases: int = Field(gt=0)


class SegmentationCard(CardBase):
    """A 3D segmenter of brain tumours into BraTS sub-regions from one to four MRI sequences."""

    task: Literal["mri_segmentation"] = "mri_segmentation"
    input: VolumeInputSpec = Field(default_factory=VolumeInputSpec)
    output_kind: Literal["logits", "probabilities"] = "logits"
    labels: list[SegmentationLabel] = Field(
        default_factory=lambda: [
            SegmentationLabel(channel=0, value=0, name="background"),
            SegmentationLabel(channel=1, value=1, name="necrotic_core"),
            SegmentationLabel(channel=2, value=2, name="oedema"),
            SegmentationLabel(channel=3, value=4, name="enhancing_tumor"),
        ],
        description="softmax output channels; enhancing tumour is 3 or 4 as the model's masks number it",
    )
    inference: SlidingWindowSpec = Field(default_factory=SlidingWindowSpec)
    torch: SegmentationArchitecture | None = None
    volume_interval: VolumeIntervalCalibration | None = Field(
        default=None, description="uncertainty volume-interval margin from labelled calibration cases (None: margin 0)"
    )
    ood: VolumeOodCalibration | None = Field(
        default=None, description="out-of-distribution threshold from in-distribution studies (None: no warning)"
    )

    @model_validator(mode="after")
    def _labels_consistent(self) -> SegmentationCard:
        channels = sorted(label.channel for label in self.labels)
        if channels != list(range(len(self.labels))):
            raise ValueError("label channels must be 0..n-1, each once")
        if len({label.value for label in self.labels}) != len(self.labels):
            raise ValueError("label values must be unique")
        names = [label.name for label in self.labels]
        if len(set(names)) != len(names) or "background" not in names:
            raise ValueError("label names must be unique and include background")
        if self.label_named("background").value != 0:
            raise ValueError("background must be label value 0")
        enhancing = [label.value for label in self.labels if label.name == ENHANCING]
        if enhancing and enhancing[0] not in (3, 4):
            raise ValueError("enhancing tumour is label value 3 or 4")
        return self

    def label_named(self, name: str) -> SegmentationLabel:
        return next(label for label in self.labels if label.name == name)

    def tumor_labels(self) -> list[SegmentationLabel]:
        """Every non-background label, in channel order."""
        return [label for label in sorted(self.labels, key=lambda lab: lab.channel) if label.name != "background"]

    def channel_values(self) -> list[int]:
        """Mask value of each output channel, in channel order."""
        return [label.value for label in sorted(self.labels, key=lambda lab: lab.channel)]

    def region_values(self) -> dict[str, list[int]]:
        """BraTS region (WT, TC, ET) -> the label values it is made of, for the regions this model can produce."""
        by_name = {label.name: label.value for label in self.labels}
        regions = {region: [by_name[name] for name in names if name in by_name] for region, names in REGION_LABELS.items()}
        return {region: values for region, values in regions.items() if values}
