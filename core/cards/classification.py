"""Card of a 2D image classifier (the `ct_classification` route): how to prepare its input, how to read its output."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.cards.base import CardBase, ModelFileName
from core.ood import OodCalibration

CT_CLASSES: tuple[str, ...] = ("Glioma", "Meningioma", "Pituitary", "No Tumor")


class Window(BaseModel):
    """A display window in Hounsfield units (or raw units for MR)."""

    center: float
    width: float = Field(gt=0)


class ImageInputSpec(BaseModel):
    """Everything preprocessing needs to turn a decoded slice into this model's input tensor."""

    model_config = ConfigDict(extra="forbid")

    height: int = Field(default=224, ge=8, le=2048)
    width: int = Field(default=224, ge=8, le=2048)
    channels: Literal[1, 3] = 1
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    resize_filter: Literal["nearest", "bilinear", "bicubic", "area"] = "bilinear"
    scaling: Literal["unit", "symmetric", "mean_std"] = Field(
        default="unit", description="unit: [0,1]; symmetric: [-1,1]; mean_std: (x - mean) / std on [0,1] input"
    )
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])
    ct_window: Window = Field(default_factory=lambda: Window(center=40, width=80), description="brain window")
    hu_clip: tuple[float, float] | None = (-100.0, 300.0)
    modalities: list[str] = Field(
        default_factory=lambda: ["CT"], description="DICOM modalities accepted; the first is the one the model was trained on"
    )
    allow_multiframe: bool = False

    @model_validator(mode="after")
    def _mean_std_fit_channels(self) -> ImageInputSpec:
        if self.scaling == "mean_std" and not (len(self.mean) == len(self.std) and len(self.mean) in (1, self.channels)):
            raise ValueError("mean and std need one value, or one per channel")
        if self.scaling == "mean_std" and any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


class TorchArchitecture(BaseModel):
    """How to rebuild the torch module whose state dict is stored beside the ONNX file (for Grad-CAM)."""

    factory: Literal["monai.ResNet"] = "monai.ResNet"
    kwargs: dict = Field(default_factory=dict)
    weights_file: ModelFileName = "model.pt"
    gradcam_layer: str = "layer4"


class ClassificationCard(CardBase):
    """A classifier of single 2D slices into the contract's classes."""

    task: Literal["ct_classification"] = "ct_classification"
    input: ImageInputSpec = Field(default_factory=ImageInputSpec)
    output_kind: Literal["probabilities", "logits"] = "logits"
    labels: list[str] = Field(min_length=2, description="the model's own output labels, in output order")
    label_map: dict[str, str] = Field(default_factory=dict, description="model label -> contract class")
    torch: TorchArchitecture | None = None
    ood: OodCalibration | None = Field(default=None, description="OOD score threshold from in-distribution images")

    @model_validator(mode="after")
    def _labels_map_to_contract(self) -> ClassificationCard:
        mapped = self.contract_labels()
        unknown = sorted(set(mapped) - set(CT_CLASSES))
        if unknown:
            raise ValueError(f"labels {unknown} do not map to the contract classes {list(CT_CLASSES)}")
        if len(set(mapped)) != len(mapped):
            raise ValueError("two model labels map to the same contract class")
        return self

    def contract_labels(self) -> list[str]:
        """The contract class of each model output, in output order."""
        return [self.label_map.get(label, label) for label in self.labels]
