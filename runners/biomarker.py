"""BiomarkerModel: a tabular model's tree heads from the model store, batched, with exact TreeSHAP for a whole batch.

`predict` returns probabilities only (no SHAP work). `explain` returns, per head and class, XGBoost's exact TreeSHAP
values (`pred_contribs`: the same path-dependent Tree SHAP that `shap.TreeExplainer` calls for XGBoost), the base
value, and the probability computed from exactly those values, so base + sum(SHAP) is the margin behind it.
XGBoost is imported where it is used, so the processes that only call this runner (the API workers) do not load it.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

import bentoml
import numpy as np

from core import store
from core.cards.tabular import TabularCard
from core.generation import with_generation
from core.settings import get_settings
from runners.array_route import ArrayRoutes
from runners.array_route import PATH as ARRAY_PATH
from runners.common import ACCESS_LOG_OFF, RUNNER_CONNECTION, softmax
from runners.switching import SwitchableModel

if TYPE_CHECKING:
    import xgboost as xgb

settings = get_settings()

XGB_THREADS = 1
"""Threads per XGBoost call: requests arrive one or a few rows at a time, where threads cost more than they give."""
ENGINE = f"xgboost-{version('xgboost')}-cpu"


@dataclass(frozen=True)
class XGBoostEngine:
    """The tree engine (CPU); named in /health like the other runners' engines."""

    name: str = ENGINE


@dataclass
class LoadedTabular:
    """A tabular model ready to serve: its card and one booster per head."""

    tag: str
    card: TabularCard
    boosters: list[xgb.Booster]
    engine: XGBoostEngine = field(default_factory=XGBoostEngine)
    loaded_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """(N, F) encoded rows -> (N, sum K) probabilities, heads side by side in card order."""
        import xgboost as xgb

        data = xgb.DMatrix(rows, nthread=XGB_THREADS)
        return np.concatenate([booster.predict(data) for booster in self.boosters], axis=1).astype(np.float32)

    def explain(self, rows: np.ndarray) -> np.ndarray:
        """(N, F) encoded rows -> (N, sum K, F + 2) float64: SHAP values of each class margin, base value, probability.

        The layout `TabularCard.read_heads` reads (BASE_COLUMN, PROBABILITY_COLUMN).
        """
        import xgboost as xgb

        data = xgb.DMatrix(rows, nthread=XGB_THREADS)
        parts = []
        for booster in self.boosters:
            contributions = booster.predict(data, pred_contribs=True).astype(np.float64)
            probabilities = softmax(contributions.sum(axis=2)).astype(np.float64)
            parts.append(np.concatenate([contributions, probabilities[..., None]], axis=2))
        return np.concatenate(parts, axis=1)


def load_tabular(model: bentoml.Model) -> LoadedTabular:
    """Load each head's booster, check it against the card, and warm both paths up with an all-missing row."""
    import xgboost as xgb

    card = store.read_card(model, TabularCard)
    boosters = []
    for head in card.heads:
        booster = xgb.Booster(params={"nthread": XGB_THREADS}, model_file=model.path_of(head.model_file))
        _check_booster(booster, card, head.name, len(head.classes))
        boosters.append(booster)
    loaded = LoadedTabular(tag=str(model.tag), card=card, boosters=boosters)
    blank = np.full((1, len(card.features)), np.nan, np.float32)
    loaded.predict(blank)
    loaded.explain(blank)
    return loaded


def _check_booster(booster: xgb.Booster, card: TabularCard, head: str, n_classes: int) -> None:
    learner = json.loads(booster.save_config())["learner"]
    outputs = int(learner["learner_model_param"]["num_class"])
    objective = learner["objective"]["name"]
    if booster.num_features() != len(card.features) or outputs != n_classes or objective != "multi:softprob":
        raise ValueError(
            f"head {head}: the booster ({booster.num_features()} features, {outputs} classes, {objective}) does not match "
            f"the card ({len(card.features)} features, {n_classes} classes, multi:softprob)"
        )


MODEL_ID = "biomarker_prediction"
MAX_BATCH = 64
ARRAY_METHODS = ("predict", "explain")
"""Methods the API calls through the array route (runners.array_route), batched as BentoML batches them."""


@bentoml.asgi_app(ArrayRoutes(ARRAY_METHODS, MAX_BATCH, settings.batch_max_latency_ms).app, path=ARRAY_PATH)
@bentoml.service(name="BiomarkerModel", workers=1, traffic={"timeout": 60}, runner_connection=RUNNER_CONNECTION,
                  logging=ACCESS_LOG_OFF)
class BiomarkerModel:
    """Runner for `biomarker_prediction`. Receives encoded rows; knows nothing of HTTP.

    The served model follows `state.active_models` (hot switch, rollback); a batch runs wholly on one model.
    """

    model_ref = bentoml.models.BentoModel(settings.biomarker.model_tag)

    def __init__(self) -> None:
        self.served = SwitchableModel(MODEL_ID, settings.biomarker.model_tag, lambda: self.model_ref, load_tabular)
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="biomarker-model")

    def _timed(self, rows: np.ndarray, method: str) -> np.ndarray:
        """`method` of the served model on the batch, each output tagged with that model's generation."""
        started = time.perf_counter()
        model, generation = self.served.get()
        output = getattr(model, method)(rows)
        self.served.record_timing(started, len(rows))
        return with_generation(output, generation)

    async def _run(self, rows: np.ndarray, method: str) -> np.ndarray:
        """A lone row runs on the event loop: the trees answer it in well under a millisecond, less than handing it to
        a thread and back costs (docs/performance.md). A batch of more runs in the one model thread, so that under
        load the loop goes on taking requests while the trees work."""
        if len(rows) == 1:
            return self._timed(rows, method)
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, self._timed, rows, method)

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=settings.batch_max_latency_ms)
    async def predict(self, rows: np.ndarray) -> np.ndarray:
        """(N, F) encoded rows -> (N, sum K + 1): probabilities, heads side by side in card order, and the generation."""
        return await self._run(rows, "predict")

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=settings.batch_max_latency_ms)
    async def explain(self, rows: np.ndarray) -> np.ndarray:
        """(N, F) encoded rows -> (N, sum K + 1, F + 2): exact TreeSHAP values, base value and probability per class,
        and the generation."""
        return await self._run(rows, "explain")

    @bentoml.api
    async def describe(self) -> dict[str, Any]:
        """Version, generation, card, engine and live timing of the served model (or why none is loaded).
        Async: answered on the event loop, not queued behind a long batch in the runner's one model thread."""
        return self.served.describe()
