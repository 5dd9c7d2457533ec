"""The replicas harness itself (tests/replicas.py): the balancer spreads requests over both replicas and each replica
answers directly (a killed replica leaving the rotation, and restarts: tests/scaleout/test_replicas_tasks.py)."""

from __future__ import annotations

import pytest

from tests.replicas import ReplicaSet

pytestmark = pytest.mark.replicas


def test_the_balancer_alternates_and_each_replica_answers_directly(replicas: ReplicaSet) -> None:
    with replicas.client() as client:
        answered = [client.get("/readyz").headers["x-replica"] for _ in range(6)]
    assert set(answered) == {"a", "b"} and all(x != y for x, y in zip(answered, answered[1:], strict=False))
    for replica in replicas.replicas:
        with replicas.client(replica) as client:
            health = client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "healthy"
        assert replica.processes() and replica.rss_mib() > 0
        assert replica.env["NEURONOVA_DISTRIBUTED__REPLICA_ID"] == replica.name
