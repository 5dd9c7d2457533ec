"""Model cards: the one description of a model (ours or a hospital's) that every room reads its settings from."""

from core.cards.base import DEMO_INTENDED_USE, CardBase, Lineage, Provenance
from core.cards.classification import (
    CT_CLASSES,
    ClassificationCard,
    ImageInputSpec,
    TorchArchitecture,
    Window,
)
from core.cards.tabular import (
    BoolFeature,
    CategoryFeature,
    FeatureSpec,
    HeadSpec,
    NumberFeature,
    TabularCard,
)

__all__ = [
    "CT_CLASSES",
    "DEMO_INTENDED_USE",
    "BoolFeature",
    "CardBase",
    "CategoryFeature",
    "ClassificationCard",
    "FeatureSpec",
    "HeadSpec",
    "ImageInputSpec",
    "Lineage",
    "NumberFeature",
    "Provenance",
    "TabularCard",
    "TorchArchitecture",
    "Window",
]
