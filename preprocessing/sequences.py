"""Which sequences a study holds, by name: the caller's `sequence_type` in the card's names, and the refusal of a
study lacking a sequence the card requires. Light (no torch): the upload guard checks a submission with it before
its task is stored, and the task body with the same functions."""

from __future__ import annotations

import re
from collections.abc import Sequence

from core.cards.segmentation import VolumeInputSpec
from core.errors import InvalidRequest

SEQUENCE_ALIASES = {
    "t1w": "T1", "t1c": "T1ce", "t1gd": "T1ce", "t1post": "T1ce", "t1+c": "T1ce", "t1contrast": "T1ce",
    "t2w": "T2", "t2flair": "FLAIR", "flair": "FLAIR",
}


def parse_sequence_types(value: str | Sequence[str] | None, spec: VolumeInputSpec) -> list[str] | None:
    """`"T1ce, FLAIR"` or `["t1c", "flair"]` -> the card's sequence names, in order; None when not given."""
    if value is None:
        return None
    names = [part for item in ([value] if isinstance(value, str) else value) for part in str(item).split(",")]
    names = [name.strip() for name in names if name.strip()]
    if not names:
        return None
    by_key = {_key(sequence): sequence for sequence in spec.sequences}
    by_key.update({alias: target for alias, target in SEQUENCE_ALIASES.items() if target in spec.sequences})
    unknown = [name for name in names if _key(name) not in by_key]
    if unknown:
        raise InvalidRequest(f"unknown sequence_type {unknown}; this model takes {spec.sequences}",
                             {"sequence_type": names, "sequences": spec.sequences})
    return [by_key[_key(name)] for name in names]


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


def check_required_sequences(received: Sequence[str], spec: VolumeInputSpec) -> None:
    """Refuse a study that lacks a sequence the model card requires, naming what is missing."""
    missing = [sequence for sequence in spec.required_sequences() if sequence not in received]
    if missing:
        raise InvalidRequest(
            f"the study lacks required sequence(s) {missing}: this model needs {spec.required_sequences()} and was not "
            "trained to segment without them; send every required sequence",
            {"reason": "missing_required_sequences", "missing": missing, "required": spec.required_sequences(),
             "received": list(received)},
        )
