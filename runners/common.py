"""What every runner shares: BentoML service options and the batching policy (engines are in `runners.engines`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from runners import batching

RUNNER_CONNECTION: dict[str, Any] = {"max_requests": 1_000_000_000, "max_age": 1e9}
"""Keep the caller's connection pool to a runner alive: BentoML 1.4.40 recycles it under load and fails requests (docs/bentoml-pitfalls.md G2)."""

batching.never_hold_lone_requests()


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 for stable sums, returned as float32."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
