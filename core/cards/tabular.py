"""Card of a tabular model (the `biomarker_prediction` route): its input schema, its output heads, its files.

The schema is data: the API validates a request against `features`, encodes it in their order, and publishes them
in /model_info. Each head is a gradient-boosted tree ensemble with a softmax over `classes`, stored in its own file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.cards.base import CardBase, ModelFileName
from core.units import UnitProblem, parse_unit

IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
NO_FINDING = "None"
SPEC_HEAD_CLASSES: dict[str, tuple[str, ...]] = {
    "metastasis_organ": ("Brain", "Lung", "Liver", "Bone", NO_FINDING),
    "stage": ("T1", "T2", "T3", "T4", NO_FINDING),
}
"""Heads SPEC.md names, with the classes a model's head of that name may have."""
FeatureValue = float | bool | str | None
"""A feature's validated value as the caller meant it (a category by its card spelling); None when missing."""
BASE_COLUMN, PROBABILITY_COLUMN = -2, -1
"""A runner's `explain` output per record is (sum of head classes, features + 2): SHAP values, base value, probability."""
SEX_CODES: dict[str, str] = {"M": "male", "F": "female", "O": "other"}
"""Administrative sex as DICOM (PatientSex) and HL7 code it, by the category it stands for."""


class _Feature(BaseModel):
    """What every input feature declares: where it sits in the request's nested JSON and whether it may be missing."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=rf"^{IDENTIFIER}(\.{IDENTIFIER})*$", description="dotted path, e.g. tumor_markers.CEA")
    group: str = Field(default="", description="display group for forms and plots")
    optional: bool = Field(default=False, description="may be absent or null: encoded as missing, routed by the trees")
    description: str = ""

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.name.split("."))


class NumberFeature(_Feature):
    """A real number within a declared range (inclusive), in `unit`; a request may give it in any unit that converts."""

    type: Literal["number"] = "number"
    unit: str = Field(min_length=1, description="UCUM-style unit the model reads, e.g. '/uL', 'ng/mL', 'years'; "
                                                "'1' for a pure number")
    min: float
    max: float

    @model_validator(mode="after")
    def _range(self) -> NumberFeature:
        if not (math.isfinite(self.min) and math.isfinite(self.max) and self.min <= self.max):
            raise ValueError(f"{self.name}: the range needs finite bounds with min <= max")
        try:
            parse_unit(self.unit)
        except UnitProblem as exc:
            raise ValueError(f"{self.name}: {exc}") from exc
        return self


class BoolFeature(_Feature):
    """true / false (1 / 0), encoded as 1 / 0."""

    type: Literal["bool"] = "bool"


class CategoryFeature(_Feature):
    """One of `categories`, or a standard code for one (`codes`, e.g. M for male), case-insensitive; encoded as the
    category's position in the list."""

    type: Literal["category"] = "category"
    categories: list[str]
    codes: dict[str, str] = Field(default_factory=dict, description="standard code -> the category it stands for")

    @model_validator(mode="after")
    def _distinct(self) -> CategoryFeature:
        folded = [c.casefold() for c in self.categories]
        if len(folded) < 2 or len(set(folded)) != len(folded):
            raise ValueError(f"{self.name}: a category needs two or more distinct categories")
        spellings = folded + [code.casefold() for code in self.codes]
        if len(set(spellings)) != len(spellings) or not set(self.codes.values()) <= set(self.categories):
            raise ValueError(f"{self.name}: each code must be distinct and stand for one of the categories")
        return self

    def category_of(self, text: str) -> str | None:
        """The category `text` names or codes (case-insensitive), or None."""
        folded = text.strip().casefold()
        spellings = {c.casefold(): c for c in self.categories} | {k.casefold(): v for k, v in self.codes.items()}
        return spellings.get(folded)

    def accepted(self) -> list[str]:
        """Every accepted spelling, for error messages and documentation."""
        return [*self.categories, *self.codes]


def sex_codes(categories: list[str]) -> dict[str, str]:
    """The standard sex codes (SEX_CODES) that stand for one of `categories`."""
    return {code: category for code, category in SEX_CODES.items() if category in categories}


FeatureSpec = Annotated[NumberFeature | BoolFeature | CategoryFeature, Field(discriminator="type")]
"""One input feature; its `type` (number, bool, category) says which fields it has."""


class HeadSpec(BaseModel):
    """One output head: a softmax over `classes`, from the tree ensemble in `model_file`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=rf"^{IDENTIFIER}$")
    classes: list[str] = Field(min_length=2, description="output classes in the model's output order")
    model_file: ModelFileName
    description: str = ""


class TabularCard(CardBase):
    """A gradient-boosted tree model over a declared feature schema, with one or more classification heads."""

    task: Literal["biomarker_prediction"] = "biomarker_prediction"
    format: Literal["xgboost"] = "xgboost"
    model_file: ModelFileName = Field(default="", description="the first head's file; every head names its own")
    features: list[FeatureSpec] = Field(min_length=1, description="model input columns, in order")
    heads: list[HeadSpec] = Field(min_length=1, description="model outputs; the first is the one SHAP plots show")
    training_params: dict[str, float | int | str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> TabularCard:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        paths = {f.path for f in self.features}
        nested = sorted(".".join(p) for p in paths if any(p[:i] in paths for i in range(1, len(p))))
        if nested:
            raise ValueError(f"features {nested} sit inside another feature")
        head_names, files = [h.name for h in self.heads], [h.model_file for h in self.heads]
        if len(set(head_names)) != len(head_names) or len(set(files)) != len(files):
            raise ValueError("head names and head model files must be unique")
        for head in self.heads:
            allowed = SPEC_HEAD_CLASSES.get(head.name)
            if allowed is not None and not set(head.classes) <= set(allowed):
                raise ValueError(f"head {head.name} classes {head.classes} are not within the contract's {list(allowed)}")
        if not self.model_file:
            self.model_file = files[0]
        elif self.model_file not in files:
            raise ValueError(f"model_file {self.model_file!r} is not a head's file")
        return self

    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def output_classes(self) -> dict[str, list[str]]:
        """Each head's classes, in output order."""
        return {head.name: list(head.classes) for head in self.heads}

    def read_heads(self, output: np.ndarray) -> dict[str, HeadOutput]:
        """Split one record's output into heads: probabilities (sum K,), or with SHAP values (sum K, features + 2)."""
        heads, start = {}, 0
        for head in self.heads:
            part = output[start:start + len(head.classes)]
            start += len(head.classes)
            if part.ndim == 1:
                heads[head.name] = HeadOutput(head.name, head.classes, part)
            else:
                heads[head.name] = HeadOutput(
                    head.name, head.classes, part[:, PROBABILITY_COLUMN], part[:, :BASE_COLUMN], part[:, BASE_COLUMN]
                )
        return heads


@dataclass(frozen=True)
class HeadOutput:
    """One head's output for one record: class probabilities and, from `explain`, each class's SHAP values."""

    name: str
    classes: list[str]
    probabilities: np.ndarray
    shap_values: np.ndarray | None = None
    base_values: np.ndarray | None = None

    @property
    def top(self) -> int:
        """Index of the predicted class."""
        return int(np.argmax(self.probabilities))
