"""What the API side knows of each runner: its loaded model's tag and card (cached briefly), calls, status, info."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import aiohttp
import numpy as np
from bentoml.exceptions import BentoMLException

from pipelines.coalescing import coalescers
from core import store
from core.cards.base import CardBase
from core.errors import ModelInferenceError, ModelNotLoaded, NeuroNovaError
from core.schemas import ModelInfo, ModelStatus
from runners.array_route import ArrayRouteClient

CardT = TypeVar("CardT", bound=CardBase)
T = TypeVar("T")
DESCRIBE_TTL_SECONDS = 2.0
"""How long a runner's description is reused: a model switched in the runner is seen by the API within this time."""
DESCRIBE_TIMEOUT_SECONDS = 10.0
"""How long /health and the routes wait for a runner to describe itself before calling it unreachable (a runner
process that BentoML is restarting does not answer for 20-40 s)."""


@dataclass(frozen=True)
class RunnerModel(Generic[CardT]):
    """The model a runner serves right now, as the runner describes it."""

    tag: str
    card: CardT
    describe: dict[str, Any]


Summary = Callable[[Any, dict[str, Any]], dict[str, Any]]


def classification_summary(card: Any, describe: dict[str, Any]) -> dict[str, Any]:
    """The /model_info fields specific to an image classifier."""
    return {
        "type": "classification",
        "input_format": ["dicom", "png", "jpeg"],
        "output_classes": card.contract_labels(),
        "xai_supported": (["grad_cam"] if describe.get("gradcam_layer") else []) + ["occlusion"],
    }


def tabular_summary(card: Any, describe: dict[str, Any]) -> dict[str, Any]:
    """The /model_info fields specific to a tabular model (its feature schema is in the card's `features`)."""
    units = {feature.name: feature.unit for feature in card.features if getattr(feature, "unit", None)}
    return {"type": "tabular", "input_format": ["json"], "output_classes": card.output_classes(),
            "xai_supported": ["shap"], "input_units": units}


def segmentation_summary(card: Any, describe: dict[str, Any]) -> dict[str, Any]:
    """The /model_info fields specific to a 3D MRI segmenter."""
    return {
        "type": "segmentation",
        "input_format": ["nifti", "dicom", "dicom-zip"],
        "output_classes": [label.name for label in card.labels],
        "xai_supported": ["grad_cam"] if describe.get("gradcam_layer") else [],
    }


STALE_CONNECTION_ERRORS = (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)
"""What a runner call meets on a pooled keep-alive connection that the runner closed while this worker's event loop
was busy (it could not read the close in time): the call never reached the runner."""


MODEL_SWITCHED = "model_switched"
"""The `details.reason` of a request or task failed because the served model changed while it ran."""
SWITCH_ATTEMPTS = 2
"""A model switch between reading the card and running the batch costs one retry, never a failed request."""


STALE_CONNECTION_ATTEMPTS = 3
"""A long stall can leave several pooled connections stale; each failed attempt discards the one it used."""


async def retried_if_stale(call: Callable[[], Awaitable[T]]) -> T:
    """`call()`, again on another connection while the pooled ones are stale. Runner methods only compute (describe,
    predict, explain, segment), so another attempt is safe; a runner that is really gone fails every attempt."""
    for _ in range(STALE_CONNECTION_ATTEMPTS - 1):
        try:
            return await call()
        except STALE_CONNECTION_ERRORS:
            continue
    return await call()


def public_load_error(error: str | None) -> str | None:
    """What the public /health says of a failure: its kind, not its message (paths, versions, hosts):
    "FileNotFoundError: [Errno 2] /models/x/model.onnx" -> "FileNotFoundError (details in the server log)"."""
    if not error:
        return None
    kind = error.split(":", 1)[0].strip()
    return f"{kind if re.fullmatch(r'[A-Za-z][A-Za-z0-9_ ]{0,60}', kind) else 'load error'} (details in the server log)"


class ModelSlot(Generic[CardT]):
    """One model route's view of its runner (a `bentoml.depends` handle).

    `batched`: the runner's row-wise batchable methods with their max batch size (`pipelines.coalescing.batched_methods`);
    concurrent calls of each are sent together (`pipelines.coalescing`). `array_methods`: methods called through the
    runner's array route (`runners.array_route`) instead of BentoML's route."""

    def __init__(self, model_id: str, runner: Any, card_type: type[CardT], summary: Summary = classification_summary,
                 batched: Mapping[str, int] | None = None, array_methods: tuple[str, ...] = ()) -> None:
        self.model_id = model_id
        self.runner = runner
        self._arrays = ArrayRouteClient(runner, array_methods)
        self.card_type = card_type
        self.summary = summary
        self._cached: tuple[float, RunnerModel[CardT]] | None = None
        self._coalescers = coalescers(self._sender, batched or {})

    def _sender(self, method: str) -> Callable[[np.ndarray], Awaitable[np.ndarray]]:
        return lambda rows: retried_if_stale(lambda: self._invoke(method, rows))

    def _invoke(self, method: str, batch: np.ndarray, *args: Any) -> Awaitable[np.ndarray]:
        if method in self._arrays.methods and not args:
            return self._arrays.call(method, batch)
        return getattr(self.runner.to_async, method)(batch, *args)

    async def describe(self) -> dict[str, Any]:
        """The runner's own description; `loaded: False` with the reason when it cannot be reached."""
        try:
            return await asyncio.wait_for(retried_if_stale(self.runner.to_async.describe), DESCRIBE_TIMEOUT_SECONDS)
        except Exception as exc:  # noqa: BLE001 - an unreachable runner is a status, not a crash
            return {"loaded": False, "error": f"runner unreachable: {type(exc).__name__}"}

    async def loaded(self) -> RunnerModel[CardT]:
        """The served model, or ModelNotLoaded (503) naming why."""
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < DESCRIBE_TTL_SECONDS:
            return self._cached[1]
        described = await self.describe()
        if not described.get("loaded"):
            self._cached = None
            raise ModelNotLoaded(f"{self.model_id} model is not loaded", {"reason": described.get("error")})
        model = RunnerModel(tag=described["tag"], card=self.card_type.model_validate(described["card"]), describe=described)
        self._cached = (now, model)
        return model

    async def generation_now(self) -> int | None:
        """The generation of the model the runner serves right now (asked, not cached); None when it cannot say."""
        return (await self.describe()).get("generation")

    def forget(self) -> None:
        """Drop the cached description (after a model switch was noticed)."""
        self._cached = None

    async def on_served_model(self, run: Callable[[RunnerModel[CardT]], Awaitable[T]],
                              generation: Callable[[T], int]) -> tuple[RunnerModel[CardT], T]:
        """`run(model)` — prepare with the served model's card, call the runner — and the model it ran on.

        The runner tags its outputs with the generation of the model that computed them (`generation(output)`); when
        that is not the generation of the card used (a switch in between), the request is prepared and run again with
        the new card, so a response always names, and was prepared for, the model that computed it."""
        for _ in range(SWITCH_ATTEMPTS):
            model = await self.loaded()
            output = await run(model)
            if generation(output) == model.describe.get("generation"):
                return model, output
            self.forget()
        raise ModelInferenceError(f"the {self.model_id} model was switched repeatedly during the request; retry it",
                                  {"reason": MODEL_SWITCHED})

    async def call(self, method: str, batch: np.ndarray, *args: Any, retry_stale: bool = True) -> np.ndarray:
        """Call a runner method with a batch (and its further arguments); runner failures become MODEL_INFERENCE_ERROR,
        an unreachable runner MODEL_NOT_LOADED. `retry_stale=False` for long calls (an MRI volume): a connection that
        breaks may then be a runner that died of the input, which must not be sent again."""
        invoke = lambda: self._invoke(method, batch, *args)  # noqa: E731
        coalescer = self._coalescers.get(method) if not args and retry_stale else None
        try:
            if coalescer is not None:
                return await coalescer(batch)
            return await (retried_if_stale(invoke) if retry_stale else invoke())
        except NeuroNovaError:
            raise
        except BentoMLException as exc:
            self._cached = None
            raise ModelInferenceError(f"{self.model_id} runner failed", {"reason": type(exc).__name__}) from exc
        except aiohttp.ClientError as exc:
            self._cached = None
            raise ModelNotLoaded(f"{self.model_id} runner is unreachable", {"reason": type(exc).__name__}) from exc

    async def status(self) -> ModelStatus:
        """The model's state for the public /health: a load failure is named by its kind only (its message, with
        paths and versions, is in the server log)."""
        described = await self.describe()
        pending = described.get("switch_pending")
        return ModelStatus(
            loaded=bool(described.get("loaded")), version=described.get("tag"), last_updated=described.get("loaded_at"),
            engine=described.get("engine"), switch_pending=pending,
            error=public_load_error(described.get("last_error") if pending else described.get("error")),
        )

    async def info(self) -> ModelInfo | None:
        """/model_info entry of the served model, or None when it is not loaded."""
        try:
            model = await self.loaded()
        except ModelNotLoaded:
            return None
        card = model.card
        return ModelInfo(
            model_id=self.model_id, name=card.name, version=model.tag, metrics=card.metrics,
            training_date=card.provenance.training_date, model_size_mb=round(store.model_size_mb(store.get_model(model.tag)), 3),
            avg_inference_time_ms=model.describe.get("avg_inference_time_ms_per_image"), intended_use=card.intended_use,
            card=card.model_dump(mode="json"), **self.summary(card, model.describe),
        )
