"""Which series of a study feed which model: rules per role (one role per required sequence), in the spirit of
MONAI Deploy's JSON series selector, applied to facts read from one representative instance of each series.

A study matches a model only when every role finds its own series (each series serves at most one role); among the
series a rule accepts, the one with most instances wins, then the lowest SeriesNumber, then the UID. Our own result
series (`is_our_output`) never match anything.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydicom.dataset import Dataset

from core.priority import ROUTINE, Priority
from postprocessing.dicom_results import OUR_MANUFACTURER
from postprocessing.result_sets import ResultObject, checked_objects

Orientation = Literal["axial", "sagittal", "coronal"]
ModelId = Literal["mri_segmentation", "ct_classification"]
FACT_KEYWORDS: tuple[str, ...] = (
    "SeriesInstanceUID", "Modality", "SeriesDescription", "SliceThickness", "ImageType", "ImageOrientationPatient",
    "SeriesNumber", "Manufacturer", "SoftwareVersions",
)
"""All `SeriesFacts.from_instance` reads (beside an enhanced image's shared functional groups): the `includefield`
values a QIDO-RS instance search needs to ask for."""
_ORIENTATION_OF_NORMAL_AXIS: tuple[Orientation, ...] = ("sagittal", "coronal", "axial")
"""The plane whose normal runs mostly along the patient's x (left-right), y (front-back) or z (head-foot) axis."""


@dataclass(frozen=True)
class SeriesFacts:
    """What selection needs of one series, read from one representative instance (no patient data).

    Every attribute but the UID may be unknown (None or empty): a rule criterion on an unknown value never matches.
    """

    series_uid: str
    instance_count: int
    modality: str | None = None
    description: str | None = None
    slice_thickness_mm: float | None = None
    image_type: tuple[str, ...] = ()
    orientation: Orientation | None = None
    series_number: int | None = None
    manufacturer: str | None = None
    software_versions: tuple[str, ...] = ()

    @classmethod
    def from_instance(cls, ds: Dataset, instance_count: int) -> SeriesFacts:
        """Facts of the series `ds` belongs to (a WADO-RS metadata or QIDO-RS instance result as a pydicom
        Dataset, e.g. `Dataset.from_json`); missing or malformed attributes become unknown, never an error."""
        return cls(
            series_uid=_text(ds, "SeriesInstanceUID") or "",
            instance_count=instance_count,
            modality=_text(ds, "Modality"),
            description=_text(ds, "SeriesDescription"),
            slice_thickness_mm=_number(ds, "SliceThickness", float),
            image_type=tuple(value.upper() for value in _values(ds, "ImageType")),
            orientation=orientation(_image_orientation(ds)),
            series_number=_number(ds, "SeriesNumber", int),
            manufacturer=_text(ds, "Manufacturer"),
            software_versions=_values(ds, "SoftwareVersions"),
        )


def is_our_output(facts: SeriesFacts) -> bool:
    """A series of results we wrote (SEG, SR, SC all carry Manufacturer `OUR_MANUFACTURER`): never a model input."""
    return facts.manufacturer == OUR_MANUFACTURER


def orientation(cosines: list[float] | None) -> Orientation | None:
    """The plane of an ImageOrientationPatient (row and column direction cosines) by its normal's largest
    component; None when absent or malformed."""
    if cosines is None or len(cosines) != 6:
        return None
    normal = np.cross(np.asarray(cosines[:3], dtype=float), np.asarray(cosines[3:], dtype=float))
    if not np.all(np.isfinite(normal)) or not np.any(normal):
        return None
    return _ORIENTATION_OF_NORMAL_AXIS[int(np.argmax(np.abs(normal)))]


class SeriesRule(BaseModel):
    """What a series must be to serve one role; every criterion given must hold, an absent one always holds."""

    model_config = ConfigDict(extra="forbid")

    modality: str | None = Field(default=None, description="DICOM Modality, e.g. MR (case-insensitive)")
    series_description: str | None = Field(default=None, description="Python regex searched, case-insensitive")
    min_slice_thickness_mm: float | None = Field(default=None, ge=0)
    max_slice_thickness_mm: float | None = Field(default=None, ge=0)
    image_type_contains: list[str] = Field(default_factory=list, description="values all in ImageType, e.g. ORIGINAL")
    orientation: Orientation | None = Field(default=None, description="plane from ImageOrientationPatient's normal")
    min_instances: int | None = Field(default=None, ge=1)

    @field_validator("series_description")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"series_description {pattern!r} is not a valid regex: {error}") from None
        return pattern

    @model_validator(mode="after")
    def _thickness_range(self) -> SeriesRule:
        low, high = self.min_slice_thickness_mm, self.max_slice_thickness_mm
        if low is not None and high is not None and low > high:
            raise ValueError(f"min_slice_thickness_mm {low} exceeds max_slice_thickness_mm {high}")
        return self

    def matches(self, facts: SeriesFacts) -> bool:
        return all(check(facts) for _, check in self._criteria())

    def describe(self) -> str:
        """The rule in words, e.g. "modality MR, description /flair/"."""
        return ", ".join(words for words, _ in self._criteria()) or "any attributes"

    def _criteria(self) -> list[tuple[str, Callable[[SeriesFacts], bool]]]:
        criteria: list[tuple[str, Callable[[SeriesFacts], bool]]] = []
        if self.modality is not None:
            wanted = self.modality.upper()
            criteria.append((f"modality {wanted}", lambda f: (f.modality or "").upper() == wanted))
        if self.series_description is not None:
            pattern = re.compile(self.series_description, re.IGNORECASE)
            criteria.append((f"description /{self.series_description}/",
                             lambda f: f.description is not None and pattern.search(f.description) is not None))
        if self.min_slice_thickness_mm is not None:
            low = self.min_slice_thickness_mm
            criteria.append((f"slice thickness >= {low:g} mm",
                             lambda f: f.slice_thickness_mm is not None and f.slice_thickness_mm >= low))
        if self.max_slice_thickness_mm is not None:
            high = self.max_slice_thickness_mm
            criteria.append((f"slice thickness <= {high:g} mm",
                             lambda f: f.slice_thickness_mm is not None and f.slice_thickness_mm <= high))
        if self.image_type_contains:
            wanted_types = {value.upper() for value in self.image_type_contains}
            shown = "\\".join(sorted(wanted_types))
            criteria.append((f"image type with {shown}",
                             lambda f: wanted_types <= set(f.image_type)))
        if self.orientation is not None:
            plane = self.orientation
            criteria.append((f"{plane} orientation", lambda f: f.orientation == plane))
        if self.min_instances is not None:
            least = self.min_instances
            criteria.append((f"at least {least} instances", lambda f: f.instance_count >= least))
        return criteria


class ModelRules(BaseModel):
    """The series one model needs: role -> rule (MRI: one role per required sequence; CT: one role), which result
    objects its run stores into the study (`postprocessing.result_sets`; unset: the model's default), and the
    priority of its jobs (`urgent`: started before every routine job waiting)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_id: ModelId
    series: dict[str, SeriesRule] = Field(min_length=1)
    results: list[ResultObject] | None = Field(default=None, description=(
        "mri_segmentation: segmentation, measurement_report, uncertainty_map (default: the first two); "
        "ct_classification: overlay_capture, heatmap_map, probability_report (default: all three)"))
    priority: Priority = Field(default=ROUTINE, description="urgent: its jobs start before every routine job waiting")

    @model_validator(mode="after")
    def _results_of_the_model(self) -> ModelRules:
        checked_objects(self.model_id, self.results)
        return self

    @property
    def result_objects(self) -> tuple[ResultObject, ...]:
        """The objects to store, in store order."""
        return checked_objects(self.model_id, self.results)


@dataclass(frozen=True)
class Selection:
    """The series chosen per role (role -> SeriesInstanceUID), or none and the reason."""

    model_id: str
    series: dict[str, str] = field(default_factory=dict)
    reason: str | None = None

    @property
    def matched(self) -> bool:
        return self.reason is None


def select_series(rules: ModelRules, series: list[SeriesFacts]) -> Selection:
    """Give every role of `rules` its own series from `series` (our own outputs and UID-less series ignored).

    Roles are served in declared order, each the most preferred series that still leaves every later role one of
    its own; without a complete assignment, the reason names a role that found no series and why.
    """
    inputs = sorted((f for f in series if f.series_uid and not is_our_output(f)), key=_preference)
    candidates = {role: [f.series_uid for f in inputs if rule.matches(f)] for role, rule in rules.series.items()}
    for role, uids in candidates.items():
        if not uids:
            return Selection(rules.model_id, reason=f"{role}: no series with {rules.series[role].describe()}")
    blocked = _unservable(candidates)
    if blocked is not None:
        rivals = sorted(other for other, uids in candidates.items()
                        if other != blocked and set(uids) & set(candidates[blocked]))
        return Selection(rules.model_id, reason=(
            f"{blocked}: every series with {rules.series[blocked].describe()} is needed by another role "
            f"({', '.join(rivals)})"))
    chosen: dict[str, str] = {}
    for role, uids in candidates.items():
        rest = {other: options for other, options in candidates.items() if other not in chosen and other != role}
        chosen[role] = next(uid for uid in uids if uid not in chosen.values()
                            and _unservable(rest, set(chosen.values()) | {uid}) is None)
    return Selection(rules.model_id, series=chosen)


def _unservable(candidates: dict[str, list[str]], used: frozenset[str] | set[str] = frozenset()) -> str | None:
    """The first role (in order) that cannot get its own series outside `used` once the roles before it have
    theirs (bipartite matching by augmenting paths, Kuhn); None when every role can."""
    owner: dict[str, str] = {}

    def place(role: str, seen: set[str]) -> bool:
        for uid in candidates[role]:
            if uid in used or uid in seen:
                continue
            seen.add(uid)
            if uid not in owner or place(owner[uid], seen):
                owner[uid] = role
                return True
        return False

    return next((role for role in candidates if not place(role, set())), None)


def _preference(facts: SeriesFacts) -> tuple[int, float, str]:
    """Most instances first, then the lowest SeriesNumber (unknown last), then the UID: a deterministic order."""
    number = facts.series_number if facts.series_number is not None else float("inf")
    return (-facts.instance_count, number, facts.series_uid)


def _image_orientation(ds: Dataset) -> list[float] | None:
    """ImageOrientationPatient, from the instance or, in an enhanced multi-frame instance, its shared groups."""
    values = _numbers(ds, "ImageOrientationPatient")
    if values is None:
        for group in _sequence(ds, "SharedFunctionalGroupsSequence"):
            for plane in _sequence(group, "PlaneOrientationSequence"):
                values = _numbers(plane, "ImageOrientationPatient")
    return values


def _sequence(ds: Dataset, keyword: str) -> Iterable[Dataset]:
    try:
        return list(ds.get(keyword) or [])
    except Exception:  # a malformed element of a foreign dataset: unknown
        return []


def _values(ds: Dataset, keyword: str) -> tuple[str, ...]:
    try:
        value = ds.get(keyword)
    except Exception:
        return ()
    if value is None:
        return ()
    items = [value] if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) else list(value)
    return tuple(str(item).strip() for item in items if str(item).strip())


def _text(ds: Dataset, keyword: str) -> str | None:
    values = _values(ds, keyword)
    return "\\".join(values) if values else None


def _numbers(ds: Dataset, keyword: str) -> list[float] | None:
    try:
        return [float(value) for value in _values(ds, keyword)] or None
    except ValueError:
        return None


def _number(ds: Dataset, keyword: str, kind: type[float] | type[int]) -> float | int | None:
    values = _numbers(ds, keyword)
    if values is None or len(values) != 1 or not np.isfinite(values[0]):
        return None
    if kind is int and not values[0].is_integer():
        return None
    return kind(values[0])
