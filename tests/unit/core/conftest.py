"""This test process as one API worker of a replica in distributed mode, on a fresh database of the session's real
PostgreSQL (`tests/postgres.py`)."""

from __future__ import annotations

from collections.abc import Iterator

import bentoml
import pytest

from core.settings import get_settings

REPLICA = "budget-unit-replica"


@pytest.fixture()
def api_worker(postgres_server, tmp_path, monkeypatch) -> Iterator[str]:
    """This process as one API worker of a replica in distributed mode, on a fresh database; its URL."""
    url = postgres_server.new_database()
    monkeypatch.setenv("NEURONOVA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("NEURONOVA_DISTRIBUTED__DATABASE_URL", url)
    monkeypatch.setenv("NEURONOVA_DISTRIBUTED__SHARED_DIR", str(tmp_path / "volume"))
    monkeypatch.setenv("NEURONOVA_DISTRIBUTED__REPLICA_ID", REPLICA)
    monkeypatch.setattr(bentoml.server_context, "service_type", "entry_service")  # as BentoML marks an API worker
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()
