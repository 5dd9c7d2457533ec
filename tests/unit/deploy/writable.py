"""Where the served service writes at run time: the environment variables naming those folders. With
`readOnlyRootFilesystem` each must be a volume in deploy/k8s (tests/unit/deploy/test_k8s_manifests.py), and a served
instance with only these folders writable must work (tests/http/test_read_only_root_http.py)."""

from __future__ import annotations

from bentoml._internal.container.generate import BENTO_PATH

WRITTEN_ENV: dict[str, str | None] = {
    "TMPDIR": "/tmp",  # tempfile's folder (its default where unset): uploads as BentoML receives them, UDS sockets
    "NEURONOVA_DATA_DIR": None,  # BentoML's task store (BENTOML_RESULT_STORE, api/tasks.py), active models, PACS jobs
    "NEURONOVA_DISTRIBUTED__SHARED_DIR": None,  # studies, task results, request cache, feedback inputs, model exports
    "BENTOML_HOME": None,  # prometheus_multiproc_dir: every worker's metrics for /metrics
    "XDG_CACHE_HOME": None,  # ONNX Runtime's device id, torch's and numba's caches (else under HOME, read-only)
    "MPLCONFIGDIR": None,  # matplotlib's font cache (SHAP plots, colour maps)
}
"""Variable → the path it means where the pod leaves it unset (None: the pod must set it)."""
MODEL_STORE = f"{BENTO_PATH}/models"
"""The model store of the bento image (BentoML serves a bento from its own store): /update_model imports into it."""
