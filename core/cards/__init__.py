"""Model cards: the one description of a model (ours or a hospital's) that every room reads its settings from."""

from core.cards.base import DEMO_INTENDED_USE, CardBase, Provenance
from core.cards.classification import CT_CLASSES, ClassificationCard, ImageInputSpec, TorchArchitecture, Window

__all__ = [
    "CT_CLASSES",
    "DEMO_INTENDED_USE",
    "CardBase",
    "ClassificationCard",
    "ImageInputSpec",
    "Provenance",
    "TorchArchitecture",
    "Window",
]
