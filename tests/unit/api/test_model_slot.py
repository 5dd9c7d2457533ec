"""The API's view of a runner: a runner that does not answer is reported unreachable in bounded time, not awaited."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from api import models
from api.models import ModelSlot
from core.cards import ClassificationCard
from core.errors import ModelNotLoaded


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
    assert not status.loaded and status.error == "runner unreachable: TimeoutError"
    with pytest.raises(ModelNotLoaded):
        asyncio.run(asyncio.wait_for(slot.loaded(), 5))
