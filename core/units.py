"""Units of numeric model inputs: a card declares each feature's unit, a request may give a value in any unit of the
same dimension, and pint converts it. Spellings are UCUM-style (`/uL`, `10*9/L`, `10^9/L`, `{cells}/uL`, `ng/mL`,
`g/dL`, `mm`, `a` or `years`); only the notation is translated here, every factor comes from pint's definitions.
"""

from __future__ import annotations

import re
from functools import lru_cache

import pint

DIMENSIONLESS = "1"
"""The unit of a pure number (a score, a ratio)."""

_ANNOTATION = re.compile(r"\{[^{}]*\}")
"""UCUM annotations (`{cells}`, `{copies}`) only name what is counted: they are the number one."""
_TEN_POWER = re.compile(r"\b10\*(-?\d+)")
"""UCUM writes 10^9 as `10*9`."""
_UCUM_ATOMS = {"a": "year", "mo": "month", "wk": "week", "d": "day", "h": "hour", "min": "minute",
               "[iU]": "IU", "[IU]": "IU"}
"""UCUM atoms whose symbol means something else (or nothing) to pint, by pint's own name for the same unit."""


class UnitProblem(ValueError):
    """A unit that pint cannot read (`kind` = "unknown_unit") or that does not convert (`kind` = "wrong_unit")."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@lru_cache(maxsize=1)
def registry() -> pint.UnitRegistry:
    """pint's default registry plus the international unit of biological activity (an arbitrary, countable unit)."""
    units = pint.UnitRegistry(autoconvert_offset_to_baseunit=True)
    units.define("international_unit = [biological_activity] = IU")
    units.define("cell = 1 = cells")  # US labs count cells per microlitre ("cells/uL"): a count is a number
    return units


def _pint_spelling(unit: str) -> str:
    text = _ANNOTATION.sub("1", unit.strip()).replace("µ", "u").replace("μ", "u")
    text = _TEN_POWER.sub(r"10**\1", text)
    text = _UCUM_ATOMS.get(text, text)
    return f"1{text}" if text.startswith("/") else text


@lru_cache(maxsize=256)
def parse_unit(unit: str) -> pint.Quantity:
    """The unit as a pint quantity (magnitude one, or a scale such as 10^9 for `10^9/L`); UnitProblem when unreadable."""
    if not unit.strip():
        raise UnitProblem("a unit is required ('1' for a pure number)", "unknown_unit")
    try:
        return registry().Quantity(registry().parse_expression(_pint_spelling(unit)))
    except Exception as exc:  # pint's parser raises whatever its tokenizer meets (AssertionError on "/", ...)
        raise UnitProblem(f"unit {unit!r} is not a known unit", "unknown_unit") from exc


def convert(value: float, given: str, expected: str) -> float:
    """`value` in unit `given` expressed in unit `expected`; UnitProblem when `given` is unknown or of another
    dimension."""
    source, target = parse_unit(given), parse_unit(expected)
    try:
        return float((value * source).to(target.units).magnitude / target.magnitude)
    except pint.errors.DimensionalityError as exc:
        raise UnitProblem(f"unit {given!r} cannot be converted to {expected!r}", "wrong_unit") from exc
