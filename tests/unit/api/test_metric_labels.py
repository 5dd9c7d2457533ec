"""The `endpoint` label of BentoML's request metrics: one of the service's routes, else `other`."""

from __future__ import annotations

import asyncio

from api.metric_labels import OTHER, REAL_PATH, EndpointLabels, _RealPath

ROUTES = ["/predict/ct_classification", "/task/{task_id}", "/pacs/jobs/{job_id}", "/predict/mri_segmentation/submit"]


def test_routes_keep_their_path_ids_become_placeholders_and_the_rest_is_other() -> None:
    labels = EndpointLabels(ROUTES)
    assert labels("/predict/ct_classification") == "/predict/ct_classification"
    assert labels("/predict/mri_segmentation/submit") == "/predict/mri_segmentation/submit"
    assert labels("/task/6f1c0ffee") == "/task/{task_id}"
    assert labels("/pacs/jobs/abc") == "/pacs/jobs/{job_id}"
    assert labels("/metrics") == "/metrics" and labels("/readyz") == "/readyz"
    for unknown in ("/task/a/b", "/predict/ct_classification/x", "/wp-login.php", "/task/", ""):
        assert labels(unknown) == OTHER


def test_the_request_below_the_metrics_gets_its_real_path_back() -> None:
    seen = []

    async def app(scope, receive, send) -> None:
        seen.append(scope["path"])

    asyncio.run(_RealPath(app)({"type": "http", "path": OTHER, REAL_PATH: "/wp-login.php"}, None, None))
    asyncio.run(_RealPath(app)({"type": "http", "path": "/health"}, None, None))
    assert seen == ["/wp-login.php", "/health"]
