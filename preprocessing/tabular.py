"""Validate nested JSON records against a TabularCard and encode them as the model's feature rows.

Training and serving both encode through `encode_records`, so the model sees the same columns either way:
numbers as float32, booleans as 0/1, a category as its position in the card's list, a missing optional value as NaN
(the trees route it along the default branch they learned). A bad record raises one InvalidRequest that lists every
bad field with its location, never the offending value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np

from core.cards.tabular import BoolFeature, CategoryFeature, FeatureSpec, FeatureValue, NumberFeature, TabularCard
from core.errors import InvalidRequest
from core.units import UnitProblem, convert

MAX_REPORTED_PROBLEMS = 100
"""An error lists at most this many problems (a body of junk keys must not make a huge error body); it counts them all."""


@dataclass(frozen=True)
class Problem:
    """One bad field: where it is (pydantic-style `loc`), what is wrong, and a machine-readable type."""

    loc: tuple[str, ...]
    msg: str
    type: str

    def as_dict(self) -> dict[str, Any]:
        return {"loc": list(self.loc), "msg": self.msg, "type": self.type}


@dataclass(frozen=True)
class EncodedRecord:
    """One validated record: its values by feature name, and its model row (float32, card feature order)."""

    values: dict[str, FeatureValue]
    row: np.ndarray

    @property
    def missing(self) -> list[str]:
        """Optional features the caller did not give."""
        return [name for name, value in self.values.items() if value is None]


def encode_request(record: Any, card: TabularCard, root: str = "biomarkers") -> EncodedRecord:
    """Validate one request's nested object and encode it; InvalidRequest lists every problem under `root`."""
    return encode_records([record], card, root=(root,))[0]


def encode_records(records: Sequence[Any], card: TabularCard, root: tuple[str, ...] = ()) -> list[EncodedRecord]:
    """Validate and encode many records (training uses this too); the locations of bad fields start with `root`."""
    encoded, problems = [], []
    for index, record in enumerate(records):
        loc = root if len(records) == 1 else (*root, str(index))
        values, record_problems = validate_record(record, card, loc)
        problems += record_problems
        if not record_problems:
            encoded.append(EncodedRecord(values, encode_values(values, card)))
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        raise InvalidRequest(
            f"{len(problems)} invalid field(s): " + "; ".join(f"{'.'.join(p.loc)}: {p.msg}" for p in shown[:10]),
            {"errors": [p.as_dict() for p in shown], "error_count": len(problems)},
        )
    return encoded


def stack_rows(records: Sequence[EncodedRecord]) -> np.ndarray:
    """(N, F) float32 model input."""
    return np.stack([r.row for r in records]).astype(np.float32, copy=False)


def validate_record(
    record: Any, card: TabularCard, loc: tuple[str, ...] = ()
) -> tuple[dict[str, FeatureValue], list[Problem]]:
    """Each feature's value (None when missing), and every problem: unknown, missing, mistyped or out-of-range fields."""
    given: dict[str, Any] = {}
    problems: list[Problem] = []
    _collect(record, _schema_tree(card), loc, given, problems)
    values: dict[str, FeatureValue] = {}
    for feature in card.features:
        raw = given.get(feature.name)
        feature_loc = (*loc, *feature.path)
        if raw is None:
            values[feature.name] = None
            if not feature.optional:
                problems.append(Problem(feature_loc, "required", "missing"))
            continue
        value, problem = _check_value(raw, feature)
        if problem is not None:
            problems.append(Problem(feature_loc, *problem))
        values[feature.name] = value
    return values, problems


def encode_values(values: Mapping[str, FeatureValue], card: TabularCard) -> np.ndarray:
    """Validated values -> (F,) float32 row in the card's feature order."""
    return np.array([_encode(values[f.name], f) for f in card.features], dtype=np.float32)


def _encode(value: FeatureValue, feature: FeatureSpec) -> float:
    if value is None:
        return math.nan
    if isinstance(feature, CategoryFeature):
        return float(feature.categories.index(value))
    return float(value)


_Tree = dict[str, "FeatureSpec | _Tree"]


def _schema_tree(card: TabularCard) -> _Tree:
    """The card's features as the nested object a request must be."""
    tree: _Tree = {}
    for feature in card.features:
        node = tree
        for key in feature.path[:-1]:
            node = node.setdefault(key, {})
        node[feature.path[-1]] = feature
    return tree


def _collect(node: Any, tree: _Tree, loc: tuple[str, ...], given: dict[str, Any], problems: list[Problem]) -> None:
    """Walk the request object along the schema tree: leaf values into `given`, unknown or non-object nodes as problems."""
    if not isinstance(node, Mapping):
        problems.append(Problem(loc, f"must be an object with fields {sorted(tree)}", "not_an_object"))
        return
    for key, item in node.items():
        sub = tree.get(key)
        if sub is None:
            problems.append(Problem((*loc, str(key)), "unknown field", "unknown_field"))
        elif not isinstance(sub, dict):
            given[sub.name] = item
        elif item is not None:
            _collect(item, sub, (*loc, key), given, problems)


def _check_value(raw: Any, feature: FeatureSpec) -> tuple[FeatureValue, tuple[str, str] | None]:
    """The canonical value, or the problem (message, type) with a raw value of this feature."""
    if isinstance(feature, BoolFeature):
        if isinstance(raw, bool) or (isinstance(raw, int) and raw in (0, 1)):
            return bool(raw), None
        return None, ("must be true or false (or 1 / 0)", "wrong_type")
    if isinstance(feature, CategoryFeature):
        category = feature.category_of(raw) if isinstance(raw, str) else None
        if category is None:
            return None, (f"must be one of {feature.accepted()}", "wrong_type" if not isinstance(raw, str)
                          else "unknown_category")
        return category, None
    return _check_number(raw, feature)


def _check_number(raw: Any, feature: NumberFeature) -> tuple[FeatureValue, tuple[str, str] | None]:
    """A plain number in the card's unit, or `{"value": number, "unit": "<UCUM-style unit>"}` converted to it."""
    unit = feature.unit
    if isinstance(raw, Mapping):
        if set(raw) != {"value", "unit"} or not isinstance(raw["unit"], str):
            return None, (f'must be a number in {unit} or {{"value": number, "unit": string}}', "wrong_type")
        raw, unit = raw["value"], raw["unit"]
    if isinstance(raw, bool) or not isinstance(raw, Real):
        return None, (f"must be a number (in {feature.unit})", "wrong_type")
    number = float(raw)
    if not math.isfinite(number):
        return None, ("must be a finite number", "not_finite")
    if unit != feature.unit:
        try:
            number = convert(number, unit, feature.unit)
        except UnitProblem as exc:
            return None, (f"{exc}; expected {feature.unit} or a unit convertible to it", exc.kind)
    if not feature.min <= number <= feature.max:
        return None, (f"must be within [{feature.min:g}, {feature.max:g}] {feature.unit}", "out_of_range")
    return number, None
