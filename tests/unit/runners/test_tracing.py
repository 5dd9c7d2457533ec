"""Unexported spans: only the request's server span is recorded (its ids name the request), others are dropped."""

from __future__ import annotations

import pytest
from bentoml._internal.configuration.containers import BentoMLContainer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind

from runners.tracing import ServerSpansOnly, drop_unexported_spans


@pytest.fixture
def bentoml_provider():
    """A tracer provider as BentoML builds it; the process's provider is put back afterwards."""
    in_use = BentoMLContainer.tracer_provider.get()
    BentoMLContainer.tracer_provider.reset()
    yield BentoMLContainer.tracer_provider.get()
    BentoMLContainer.tracer_provider.set(in_use)


def test_without_an_exporter_only_server_spans_are_recorded(bentoml_provider: TracerProvider) -> None:
    BentoMLContainer.tracer_provider.set(bentoml_provider)
    drop_unexported_spans()
    drop_unexported_spans()  # idempotent
    provider = BentoMLContainer.tracer_provider.get()
    assert isinstance(provider.sampler, ServerSpansOnly) and provider.sampler.inner is bentoml_provider.sampler
    tracer = provider.get_tracer(__name__)
    with tracer.start_as_current_span("request", kind=SpanKind.SERVER) as request:
        with tracer.start_as_current_span("http send") as message:
            assert request.is_recording() and request.context.span_id  # what BentoML's request id is read from
            assert not message.is_recording()
            assert message.get_span_context().trace_id == request.context.trace_id


def test_with_an_exporter_bentomls_provider_is_kept(bentoml_provider: TracerProvider) -> None:
    BentoMLContainer.tracer_provider.set(bentoml_provider)
    BentoMLContainer.config.tracing.exporter_type.set("otlp")
    try:
        drop_unexported_spans()
    finally:
        BentoMLContainer.config.tracing.exporter_type.set(None)
    assert BentoMLContainer.tracer_provider.get() is bentoml_provider
