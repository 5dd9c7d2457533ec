"""PHI hygiene for identifiers: a patient id must look anonymised (e.g. `P123456`) before any route accepts it.

The configurable pattern (`NEURONOVA_PATIENT_ID_PATTERN`) says what an anonymised id looks like; on top of it a
floor that no pattern loosens: no whitespace, no DICOM person name (`Last^First`), nothing that reads as a date.
Refusals never echo the value.
"""

from __future__ import annotations

import re
from datetime import datetime
from functools import lru_cache
from typing import Annotated

from pydantic import AfterValidator, Field

from core.settings import get_settings

DATE_FORMATS = ("%Y%m%d", "%Y-%m-%d", "%Y.%m.%d", "%Y_%m_%d", "%d.%m.%Y", "%d-%m-%Y", "%m-%d-%Y", "%d%m%Y", "%d.%m.%y")
"""Date spellings a birth or study date arrives in (DICOM DA first); a value that parses as one is refused."""
DATE_CHARACTERS = re.compile(r"[0-9._-]{6,10}")
"""What every DATE_FORMATS spelling is made of (digits and its separators, 6 to 10 of them): anything else is no date,
and is not tried against each format (most ids carry a letter)."""
NAME_OR_SPACE = re.compile(r"[\s^,]")
"""Whitespace, the DICOM person-name component separator `^`, or the comma of `Last, First`."""


@lru_cache(maxsize=4)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def looks_like_date(value: str) -> bool:
    """True when `value` parses as a calendar date in one of DATE_FORMATS."""
    if not DATE_CHARACTERS.fullmatch(value):
        return False
    for fmt in DATE_FORMATS:
        try:
            datetime.strptime(value, fmt)
        except ValueError:
            continue
        return True
    return False


def check_patient_id(value: str) -> str:
    """Return `value` if it looks anonymised; raise ValueError (without the value) otherwise."""
    if NAME_OR_SPACE.search(value):
        raise ValueError("patient_id must be an anonymised id (e.g. P123456), not a name: whitespace, '^' and ',' are refused")
    if looks_like_date(value):
        raise ValueError("patient_id must be an anonymised id (e.g. P123456), not a date")
    if not _compiled(get_settings().patient_id_pattern).fullmatch(value):
        raise ValueError("patient_id does not match the configured anonymised-id pattern (e.g. P123456)")
    return value


PatientId = Annotated[
    str,
    Field(min_length=1, max_length=128, description="anonymised patient id, e.g. P123456 (no names, no dates)",
          json_schema_extra={"pattern": get_settings().patient_id_pattern}),
    AfterValidator(check_patient_id),
]
"""The type of every `patient_id` parameter. The pattern is checked with Python's `re` (lookarounds allowed) and
shown in the OpenAPI schema."""
