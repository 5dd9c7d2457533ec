"""BentoML's media type of an IO descriptor, worked out once per class instead of once per response.

BentoML 1.4.40 (`_bentoml_sdk.io_models.IOMixin.mime_type`) reads a root model's media type (a runner method's
ndarray output) off its JSON schema, which pydantic builds anew — a TypeAdapter and a schema walk — on every response:
0.12 ms of the ~1.8 ms of CPU a biomarker runner spends on a lone request (docs/performance.md). The answer depends
on the class alone, so it is cached per class, in the process that calls this (the runners, through runners.common).
"""

from __future__ import annotations

import functools

from _bentoml_sdk.io_models import IOMixin


def cache_media_types() -> None:
    """Make `IOMixin.mime_type` remember its answer per class (idempotent)."""
    compute = IOMixin.mime_type.__func__
    if not hasattr(compute, "cache_info"):
        IOMixin.mime_type = classmethod(functools.cache(compute))
