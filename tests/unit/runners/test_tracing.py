"""Tracing only where traces are exported: BentoML's tracing middleware passes requests straight through otherwise."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from bentoml._internal.configuration.containers import BentoMLContainer
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from runners.tracing import trace_only_when_exported


@pytest.fixture
def exporter_type() -> Iterator[None]:
    """BentoML's excluded-URL list rebuilt from the configuration, and both put back afterwards."""
    in_use = BentoMLContainer.tracing_excluded_urls.get()
    BentoMLContainer.tracing_excluded_urls.reset()
    yield
    BentoMLContainer.config.tracing.exporter_type.set(None)
    BentoMLContainer.tracing_excluded_urls.set(in_use)


def spans_of_one_request() -> int:
    """Spans recorded for one request through OpenTelemetry's ASGI middleware, built as BentoML builds it."""
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    app = Starlette(routes=[Route("/predict/biomarker_prediction", lambda request: JSONResponse({}), methods=["POST"])])
    traced = OpenTelemetryMiddleware(app, excluded_urls=BentoMLContainer.tracing_excluded_urls.get(),
                                     tracer_provider=provider)
    assert TestClient(traced).post("/predict/biomarker_prediction").status_code == 200
    return len(exported.get_finished_spans())


def test_without_an_exporter_no_request_is_traced(exporter_type: None) -> None:
    assert spans_of_one_request() > 0  # BentoML's default: every request traced (and its spans thrown away)
    trace_only_when_exported()
    trace_only_when_exported()  # idempotent
    assert spans_of_one_request() == 0


def test_with_an_exporter_requests_are_traced_as_configured(exporter_type: None) -> None:
    BentoMLContainer.config.tracing.exporter_type.set("otlp")
    trace_only_when_exported()
    assert spans_of_one_request() > 0
