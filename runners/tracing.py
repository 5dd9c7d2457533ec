"""Requests are traced only when the traces go somewhere.

BentoML 1.4.40 wraps every request of every service in OpenTelemetry's ASGI middleware and samples with
`ParentBasedTraceIdRatio`, which *records* every span it does not sample (`Decision.RECORD_ONLY`): a full SDK span for
the request and one more for each of its ASGI messages, built and thrown away — ~25 % of a biomarker runner's CPU per
lone request and ~15 % of an API worker's (py-spy, docs/performance.md). When no exporter is configured (BentoML's
`tracing.exporter_type`, unset by default) nothing is ever sent, so every URL is excluded from tracing and the
middleware passes requests straight through. BentoML then adds no `X-BentoML-Request-ID` header; every response body
and access-log line carries the service's own `request_id`. With an exporter configured, tracing is BentoML's, as
configured (sample rate, excluded URLs).
"""

from __future__ import annotations

from bentoml._internal.configuration.containers import BentoMLContainer
from opentelemetry.util.http import ExcludeList

EVERY_URL = ExcludeList([".*"])


def trace_only_when_exported() -> None:
    """Where no tracing exporter is configured, exclude every URL from BentoML's tracing middleware (idempotent)."""
    if not BentoMLContainer.config.tracing.exporter_type.get():
        BentoMLContainer.tracing_excluded_urls.set(EVERY_URL)
