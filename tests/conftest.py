"""Test session set-up: a private BentoML home holding the demo models, trained once and kept between runs."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("BENTOML_HOME", str(ROOT / ".bentoml-test"))
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_models() -> dict[str, str]:
    """Make sure every demo model is in the test store (trains the missing ones; minutes on a clean clone)."""
    from training_export.demo import ensure_demo_models

    return ensure_demo_models()


@pytest.fixture(scope="session")
def ct_model() -> str:
    """The demo CT classifier in the test store (trained on first use)."""
    from training_export.demo import ensure_demo_models

    return ensure_demo_models(["neuronova-ct"])["neuronova-ct"]


IN_PROCESS_SECRET = "inprocess-secret-0123456789-abcdefghij"


@pytest.fixture(scope="session")
def inprocess_client(demo_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """NeuroNova's ASGI app in this process (runners too), once per session: BentoML registers its Prometheus
    metrics per app, so a second app in one process fails. Carries a valid clinician token."""
    import time

    import jwt

    os.environ["NEURONOVA_AUTH__SECRET"] = IN_PROCESS_SECRET
    os.environ["NEURONOVA_DATA_DIR"] = str(tmp_path_factory.mktemp("inprocess-data"))
    from core.settings import get_settings

    get_settings.cache_clear()
    from _bentoml_impl.tasks import Sqlite3Store
    from starlette.testclient import TestClient

    from api.tasks import bentoml_result_store_path
    from service import NeuroNova

    Sqlite3Store.init_db(str(bentoml_result_store_path()))
    token = jwt.encode({"sub": "tests", "exp": int(time.time()) + 3600}, IN_PROCESS_SECRET, algorithm="HS256")
    with TestClient(NeuroNova.to_asgi(), headers={"Authorization": f"Bearer {token}"}) as client:
        yield client
