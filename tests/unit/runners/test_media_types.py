"""The per-class cache of BentoML's IO media types: same answers as BentoML's own computation, computed once."""

from __future__ import annotations

from _bentoml_sdk.io_models import IOMixin

from runners.biomarker import BiomarkerModel
from runners.ct import CTClassifier
from runners.media_types import cache_media_types


def test_cached_media_types_are_bentomls_own_computed_once() -> None:
    cache_media_types()  # as api.bentoml_patches.install does; a second call changes nothing
    cached = IOMixin.mime_type.__func__
    specs = [spec for service in (BiomarkerModel, CTClassifier) for api in service.apis.values()
             for spec in (api.input_spec, api.output_spec)]
    assert {spec.mime_type() for spec in specs} == {cached.__wrapped__(spec) for spec in specs}
    hits = cached.cache_info().hits
    for spec in specs:
        spec.mime_type()
    assert cached.cache_info().hits == hits + len(specs)
    assert IOMixin.mime_type.__func__ is cached
