"""Spans that no exporter will ever send are not recorded, but the request's own span, whose ids BentoML reads.

BentoML 1.4.40 samples with `ParentBasedTraceIdRatio`, which *records* every span it does not sample
(`Decision.RECORD_ONLY`): a full OpenTelemetry SDK span for each request and one more for each ASGI message of it,
built and thrown away. That was ~25 % of a biomarker runner's CPU per lone request (py-spy, docs/performance.md).
When no exporter is configured (BentoML's `tracing.exporter_type`, unset by default) nothing is ever sent, so the
service's tracer provider is replaced by one that still records each request's server span — BentoML takes its
`X-BentoML-Request-ID` and log ids from it — and drops the per-message spans. With an exporter configured, BentoML's
provider (and its sample rate) is left as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bentoml._internal.configuration.containers import BentoMLContainer
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, get_current_span
from opentelemetry.util.types import Attributes


class ServerSpansOnly(Sampler):
    """`inner`'s decision for server spans; every other span dropped."""

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner

    def should_sample(self, parent_context: Context | None, trace_id: int, name: str, kind: SpanKind | None = None,
                      attributes: Attributes = None, links: Sequence[Link] | None = None,
                      trace_state: Any = None) -> SamplingResult:
        if kind == SpanKind.SERVER:
            return self.inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)
        return SamplingResult(Decision.DROP, None, get_current_span(parent_context).get_span_context().trace_state)

    def get_description(self) -> str:
        return f"ServerSpansOnly{{{self.inner.get_description()}}}"


def drop_unexported_spans() -> None:
    """Where no tracing exporter is configured, serve with a provider that records only server spans (idempotent)."""
    if BentoMLContainer.config.tracing.exporter_type.get():
        return
    provider = BentoMLContainer.tracer_provider.get()
    if not isinstance(provider.sampler, ServerSpansOnly):
        BentoMLContainer.tracer_provider.set(TracerProvider(sampler=ServerSpansOnly(provider.sampler),
                                                            resource=provider.resource))
