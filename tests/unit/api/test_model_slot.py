"""The API's view of a runner: a runner that does not answer is reported unreachable in bounded time, not awaited."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import aiohttp
import numpy as np
import pytest
from pydantic import BaseModel

from pipelines import runner_slots as models
from pipelines.runner_slots import ModelSlot
from core.cards import ClassificationCard
from core.errors import ModelInferenceError, ModelNotLoaded


class SilentRunner:
    """A runner process that BentoML is restarting: its describe call never returns."""

    def __init__(self) -> None:
        self.to_async = SimpleNamespace(describe=self._describe)

    async def _describe(self) -> dict:
        await asyncio.sleep(3600)
        return {}


def test_a_silent_runner_is_unreachable_after_the_timeout(monkeypatch):
    monkeypatch.setattr(models, "DESCRIBE_TIMEOUT_SECONDS", 0.05)
    slot = ModelSlot("ct_classification", SilentRunner(), ClassificationCard)

    status = asyncio.run(asyncio.wait_for(slot.status(), 5))
    assert not status.loaded and status.error == "runner unreachable (details in the server log)"
    with pytest.raises(ModelNotLoaded):
        asyncio.run(asyncio.wait_for(slot.loaded(), 5))


class StaleConnectionsRunner:
    """A runner reached through `stale` pooled connections that it closed while the worker's event loop was busy:
    each call on one fails with aiohttp's ClientOSError before reaching the runner, then the runner answers."""

    def __init__(self, stale: int) -> None:
        self.stale = stale
        self.calls: list[str] = []
        self.to_async = SimpleNamespace(describe=self._describe, predict=self._predict)

    def _connection(self, method: str) -> None:
        self.calls.append(method)
        if self.stale:
            self.stale -= 1
            raise aiohttp.ClientOSError(104, "Connection reset by peer")

    async def _describe(self) -> dict:
        self._connection("describe")
        return {"loaded": True, "tag": "neuronova-ct:v1"}

    async def _predict(self, batch: np.ndarray) -> np.ndarray:
        self._connection("predict")
        return batch * 2


def test_stale_pooled_connections_are_retried_not_reported_as_an_unloaded_model():
    runner = StaleConnectionsRunner(stale=models.STALE_CONNECTION_ATTEMPTS - 1)
    slot = ModelSlot("ct_classification", runner, ClassificationCard)

    assert asyncio.run(slot.describe())["loaded"] is True
    assert runner.calls == ["describe"] * models.STALE_CONNECTION_ATTEMPTS
    runner.stale, runner.calls = 1, []
    np.testing.assert_array_equal(asyncio.run(slot.call("predict", np.ones(3))), np.full(3, 2.0))
    assert runner.calls == ["predict", "predict"]


def test_a_runner_that_resets_every_attempt_is_unreachable_after_a_bounded_number():
    runner = StaleConnectionsRunner(stale=10)
    slot = ModelSlot("ct_classification", runner, ClassificationCard)

    status = asyncio.run(slot.status())
    assert not status.loaded and status.error == "runner unreachable (details in the server log)"
    assert len(runner.calls) == models.STALE_CONNECTION_ATTEMPTS
    runner.calls = []
    with pytest.raises(ModelNotLoaded) as refused:  # 503 in the error schema, not a 500
        asyncio.run(slot.call("predict", np.ones(3)))
    assert refused.value.details == {"reason": "ClientOSError"} and len(runner.calls) == models.STALE_CONNECTION_ATTEMPTS
    runner.calls = []
    with pytest.raises(ModelNotLoaded):  # a long call is never sent twice
        asyncio.run(slot.call("predict", np.ones(3), retry_stale=False))
    assert runner.calls == ["predict"]



class Card(BaseModel):
    """The little of a card this test needs: which version it describes."""

    version: str


class SwitchingRunner:
    """A runner whose model is switched (a new generation, a new card) between the API reading the card and the
    call running, `switches` times in a row."""

    def __init__(self, switches: int) -> None:
        self.switches = switches
        self.generation = 1
        self.to_async = SimpleNamespace(describe=self._describe)

    async def _describe(self) -> dict:
        return {"loaded": True, "tag": f"m:v{self.generation}", "generation": self.generation,
                "card": {"version": f"v{self.generation}"}}

    async def run(self, model: models.RunnerModel[Card]) -> tuple[str, int]:
        """Prepared with `model`'s card, computed by the model served when the call runs (its generation)."""
        if self.switches:
            self.switches -= 1
            self.generation += 1
        return model.card.version, self.generation


def test_a_switch_during_a_request_runs_it_again_on_the_new_model():
    runner = SwitchingRunner(switches=1)
    slot = ModelSlot("m", runner, Card)
    model, (prepared_with, computed_by) = asyncio.run(slot.on_served_model(runner.run, lambda out: out[1]))
    assert (model.tag, prepared_with, computed_by) == ("m:v2", "v2", 2)  # named, prepared and computed alike


def test_a_model_switched_at_every_attempt_fails_the_request_instead_of_naming_the_wrong_one():
    runner = SwitchingRunner(switches=models.SWITCH_ATTEMPTS)
    slot = ModelSlot("m", runner, Card)
    with pytest.raises(ModelInferenceError, match="switched repeatedly") as failed:
        asyncio.run(slot.on_served_model(runner.run, lambda out: out[1]))
    assert failed.value.details == {"reason": models.MODEL_SWITCHED}


@pytest.mark.parametrize(("error", "public"), [
    ("FileNotFoundError: [Errno 2] No such file: '/home/bentoml/models/x/model.onnx'",
     "FileNotFoundError (details in the server log)"),
    ("neuronova-ct:abc is not in this replica's store nor on the shared volume",
     "load error (details in the server log)"),
    (None, None),
])
def test_the_public_health_names_a_load_failure_without_its_message(error, public):
    assert models.public_load_error(error) == public


def test_a_replica_that_could_not_take_a_switch_reports_it_degraded():
    async def describe():
        return {"loaded": True, "tag": "neuronova-ct:v1", "loaded_at": "now", "engine": "onnx",
                "last_error": "MemoryError: /models/neuronova-ct/v2 needs 3 GiB", "switch_pending": "neuronova-ct:v2"}

    runner = SimpleNamespace(to_async=SimpleNamespace(describe=describe))
    status = asyncio.run(ModelSlot("ct_classification", runner, ClassificationCard).status())
    assert status.loaded and status.version == "neuronova-ct:v1" and status.switch_pending == "neuronova-ct:v2"
    assert status.error == "MemoryError (details in the server log)"
