"""What an MRI submission is refused for before its task is stored: a study that, by its `sequence_type`, lacks a
sequence the served model requires. The task would fail with this very error (`pipelines.mri`: the same parsing and check,
on the same card); where only decoding tells which sequences came, it still does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipelines.runner_slots import ModelSlot
from api.uploads import FieldCheck
from core.cards.segmentation import SegmentationCard
from core.errors import InvalidRequest, NeuroNovaError
from preprocessing.sequences import check_required_sequences, parse_sequence_types

SEQUENCE_FIELD = "sequence_type"


def missing_sequences_check(slot: Callable[[], ModelSlot[SegmentationCard]]) -> FieldCheck:
    """A check of `sequence_type` against the required sequences of the model `slot()` serves now. A value the task
    cannot parse, or a model that cannot be described, passes: the task answers for them as before."""

    async def check(value: Any) -> InvalidRequest | None:
        if not (isinstance(value, str) or isinstance(value, list) and all(isinstance(item, str) for item in value)):
            return None  # not a `list[str] | str`: the route's own validation answers
        try:
            card = (await slot().loaded()).card
            sequence_types = parse_sequence_types(value, card.input)
        except NeuroNovaError:  # the model cannot be described, or a name it does not know: the task's to answer
            return None
        try:
            if sequence_types is not None:
                check_required_sequences(sequence_types, card.input)
        except InvalidRequest as exc:
            return exc
        return None

    return check
