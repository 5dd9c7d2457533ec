"""Adaptive batching that never holds a lone request back.

BentoML 1.4.40's dispatcher (`bentoml._internal.marshal.dispatcher.CorkDispatcher`) learns the average time the first
request of each batch waited, and afterwards holds a new request about that long, hoping for company. Under load that
time is mostly spent queued behind the busy model, so after a burst every lone request was held for it, for tens of
seconds (1-client p50 after a 32-client burst: 62 ms against 18 ms fresh; docs/performance.md). With the learned
wait pinned at zero a batch leaves as soon as the model is free, holding whatever queued meanwhile: batches still grow
with the load (what a GPU needs) and a lone request goes at once. BentoML offers no setting for this, so the
dispatcher's optimizer class is replaced in the (pinned) module before the runner's server builds its dispatchers.
"""

from __future__ import annotations

from bentoml._internal.marshal import dispatcher


class NoWaitOptimizer(dispatcher.Optimizer):
    """BentoML's estimate of the model's cost per batch (used for its overload shedding), without a learned wait."""

    def trigger_refresh(self) -> None:
        super().trigger_refresh()
        self.wait = 0.0


def never_hold_lone_requests() -> None:
    """Make every dispatcher built from now on in this process use NoWaitOptimizer."""
    dispatcher.Optimizer = NoWaitOptimizer
