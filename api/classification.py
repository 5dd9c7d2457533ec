"""The CT classification pipeline on the API side: decode, prepare as the served model's card says, run, explain."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from api.models import ModelSlot, RunnerModel
from core.cards.classification import ClassificationCard
from core.errors import ModelInferenceError
from core.imaging import DecodedSlice
from preprocessing.decode import decode_slice
from preprocessing.transforms import PreparedSlice, prepare_slice

ATTEMPTS = 2
"""A model switch between reading the card and running the batch costs one retry, never a failed request."""


@dataclass(frozen=True)
class Classified:
    """One slice's classification and the exact model version that produced it."""

    model: RunnerModel[ClassificationCard]
    decoded: DecodedSlice
    prepared: PreparedSlice
    probabilities: np.ndarray
    heatmap: np.ndarray | None


async def classify_slice(slot: ModelSlot[ClassificationCard], data: bytes, filename: str | None, *, explain: bool,
                         max_pixels: int) -> Classified:
    """Decode and prepare with the served model's card, predict (and Grad-CAM) in the batched runner.

    The runner tags each output row with its model generation; when that differs from the card used to prepare the
    input (a switch happened in between), the slice is prepared again with the new card.
    """
    for _ in range(ATTEMPTS):
        model = await slot.loaded()
        card = model.card
        decoded = decode_slice(data, filename, max_pixels=max_pixels, allow_multiframe=card.input.allow_multiframe,
                               modalities=card.input.modalities)
        prepared = prepare_slice(decoded, card.input)
        batch = prepared.tensor[None]
        calls = [slot.call("predict", batch)] + ([slot.call("explain", batch)] if explain else [])
        outputs = await asyncio.gather(*calls)
        probabilities, generation = outputs[0][0, :-1], int(outputs[0][0, -1])
        if generation == model.describe.get("generation"):
            return Classified(model, decoded, prepared, probabilities, outputs[1][0] if explain else None)
        slot.forget()
    raise ModelInferenceError("the CT model was switched repeatedly during the request; retry it")
