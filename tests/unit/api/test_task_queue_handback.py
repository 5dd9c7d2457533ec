"""Distributed mode: which failures of a queued MRI attempt hand the task back to the queue instead of failing it."""

from __future__ import annotations

import asyncio
from http import HTTPStatus

import pytest
from bentoml.exceptions import BentoMLException

from state.job_queue import MAX_RUNS, HandedBack, MriQueue, runner_not_serving
from core.errors import InvalidRequest, ModelInferenceError, ModelNotLoaded


def queue() -> MriQueue:
    """A queue object as an API worker builds it (procrastinate connects only when opened)."""
    return MriQueue(store=None, database_url="postgresql://nobody@127.0.0.1:9/none", replica="r",  # type: ignore[arg-type]
                    shutdown_grace_s=15.0)


def failing(error: Exception):
    async def work() -> None:
        raise error
    return work


def answered_503() -> ModelInferenceError:
    try:
        raise BentoMLException("Error making request: 503", error_code=HTTPStatus.SERVICE_UNAVAILABLE)
    except BentoMLException as cause:
        try:
            raise ModelInferenceError("mri_segmentation runner failed", {"reason": "BentoMLException"}) from cause
        except ModelInferenceError as error:
            return error


def test_a_runner_not_serving_yet_is_told_from_a_failed_inference() -> None:
    assert runner_not_serving(ModelNotLoaded("mri_segmentation runner is unreachable"))
    assert runner_not_serving(answered_503())
    assert not runner_not_serving(ModelInferenceError("mri_segmentation runner failed"))
    assert not runner_not_serving(InvalidRequest("no FLAIR"))


@pytest.mark.parametrize("error", [ModelNotLoaded("unreachable"), answered_503()])
def test_an_attempt_whose_runner_is_not_serving_is_handed_back_until_the_last_run(error: Exception) -> None:
    with pytest.raises(HandedBack):
        asyncio.run(queue().guarded(failing(error), "task@1")())
    with pytest.raises(type(error)):  # the last run allowed fails the task instead of leaving it pending for ever
        asyncio.run(queue().guarded(failing(error), f"task@{MAX_RUNS}")())


def test_a_bad_input_fails_the_attempt_and_a_stopping_worker_hands_any_failure_back() -> None:
    with pytest.raises(InvalidRequest):
        asyncio.run(queue().guarded(failing(InvalidRequest("no FLAIR")), "task@1")())
    stopping = queue()
    stopping.stopping = True
    with pytest.raises(HandedBack):
        asyncio.run(stopping.guarded(failing(InvalidRequest("runner gone mid-shutdown")), "task@1")())
