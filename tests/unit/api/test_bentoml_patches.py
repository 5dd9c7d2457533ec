"""BentoML's patches: one explicit install, refused on any BentoML but the pinned one, each patch installed once."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import bentoml
import pytest
import uvicorn
from _bentoml_sdk.io_models import IOMixin
from _bentoml_sdk.method import APIMethod
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.marshal import dispatcher
from bentoml._internal.server.http import instruments

from api import bentoml_patches, metric_labels
from api.log_redaction import BENTOML_REQUEST_LOGGER, ValidationInputFilter
from runners.batching import NoWaitOptimizer
from runners.tracing import EVERY_URL

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A process where nothing is installed yet; every patched attribute is put back afterwards."""
    monkeypatch.setattr(bentoml_patches, "_installed", set())
    monkeypatch.setattr(dispatcher, "Optimizer", dispatcher.Optimizer)
    monkeypatch.setattr(IOMixin, "mime_type", IOMixin.__dict__["mime_type"])
    monkeypatch.setattr(APIMethod, "_local_call", APIMethod._local_call)
    monkeypatch.setattr(uvicorn.Config, "get_loop_factory", uvicorn.Config.get_loop_factory)
    monkeypatch.setattr(instruments, "RunnerTrafficMetricsMiddleware", instruments.RunnerTrafficMetricsMiddleware)
    loggers = [logging.getLogger(BENTOML_REQUEST_LOGGER), *logging.getLogger().handlers]
    filters = [list(each.filters) for each in loggers]
    excluded = BentoMLContainer.tracing_excluded_urls.get()
    BentoMLContainer.tracing_excluded_urls.reset()
    yield
    BentoMLContainer.tracing_excluded_urls.set(excluded)
    for each, kept in zip(loggers, filters, strict=True):
        each.filters[:] = kept


def test_the_pinned_version_is_the_one_requirements_install() -> None:
    pins = re.findall(r"^bentoml==(\S+)\s*$", (ROOT / "requirements.txt").read_text(), flags=re.MULTILINE)
    assert pins == [bentoml_patches.PINNED_BENTOML]


def test_another_bentoml_version_is_refused_before_anything_is_patched(
        fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    applied: list[str] = []
    monkeypatch.setattr(bentoml_patches, "PATCHES", {name: (lambda name=name: applied.append(name))
                                                     for name in bentoml_patches.PATCHES})
    monkeypatch.setattr(bentoml, "__version__", "1.4.41")
    middleware = instruments.RunnerTrafficMetricsMiddleware

    with pytest.raises(RuntimeError) as refused:
        bentoml_patches.install(["/healthz"])

    assert "BentoML 1.4.41 is installed" in str(refused.value)
    assert f"bentoml=={bentoml_patches.PINNED_BENTOML}" in str(refused.value)
    assert applied == [] and bentoml_patches._installed == set()
    assert instruments.RunnerTrafficMetricsMiddleware is middleware


def test_each_patch_is_installed_once_however_often_install_is_called(
        fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    applied: list[str] = []
    monkeypatch.setattr(bentoml_patches, "PATCHES", {name: (lambda name=name: applied.append(name))
                                                     for name in bentoml_patches.PATCHES})
    monkeypatch.setattr(metric_labels, "install", lambda routes: applied.append(bentoml_patches.ENDPOINT_LABELS))

    first = bentoml_patches.install()
    bentoml_patches.install()
    everything = bentoml_patches.install(["/healthz"])
    bentoml_patches.install(["/healthz", "/other"])

    assert first == frozenset(bentoml_patches.PATCHES)
    assert sorted(applied) == sorted([*bentoml_patches.PATCHES, bentoml_patches.ENDPOINT_LABELS])
    assert everything == frozenset(applied)


def test_after_install_every_patch_is_in_place(fresh: None) -> None:
    original_loop_factory = uvicorn.Config.get_loop_factory

    installed = bentoml_patches.install(["/healthz", "/task/{task_id}"])

    assert installed == frozenset([*bentoml_patches.PATCHES, bentoml_patches.ENDPOINT_LABELS])
    assert isinstance(dispatcher.Optimizer(max_latency=1.0), NoWaitOptimizer)
    assert hasattr(IOMixin.mime_type.__func__, "cache_info")
    assert getattr(APIMethod._local_call, "__cached__", False)
    if not BentoMLContainer.config.tracing.exporter_type.get():
        assert BentoMLContainer.tracing_excluded_urls.get() is EVERY_URL
    assert any(isinstance(f, ValidationInputFilter) for f in logging.getLogger(BENTOML_REQUEST_LOGGER).filters)
    assert uvicorn.Config.get_loop_factory is not original_loop_factory
    assert instruments.RunnerTrafficMetricsMiddleware.__name__ == "BoundedEndpointLabels"
