"""Which model computed a runner's output: the runners tag each output with their served model's generation.

Along a runner output's class axis, after the classes (and for CT the OOD score), one more entry carries the generation
of the model that computed it (`runners.switching.SwitchableModel` counts them). The API compares it with the
generation of the card it prepared the input with (`pipelines.runner_slots.ModelSlot.on_served_model`), so a response never names
a model version that did not compute it.
"""

from __future__ import annotations

import numpy as np

GENERATION_SLOT = -1


def with_generation(output: np.ndarray, generation: int) -> np.ndarray:
    """A batch of outputs (N, K, ...) with the generation appended along the class axis: (N, K + 1, ...)."""
    slot = np.full((output.shape[0], 1, *output.shape[2:]), generation, dtype=output.dtype)
    return np.concatenate([output, slot], axis=1)


def output_generation(output: np.ndarray) -> int:
    """The model generation one record's output (K + 1, ...) was computed by."""
    return int(np.asarray(output[GENERATION_SLOT]).flat[0])
