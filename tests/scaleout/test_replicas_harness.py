"""The replicas harness itself (tests/replicas.py): the balancer spreads requests over both replicas, each replica
answers directly, and a stopped replica leaves the rotation and comes back."""

from __future__ import annotations

import httpx
import pytest

from tests.replicas import ReplicaSet, wait_balanced

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


def test_a_stopped_replica_leaves_the_rotation_and_returns(both_serving: ReplicaSet) -> None:
    a = both_serving.replica("a")
    assert a.stop() < 30 and not a.processes()
    wait_balanced(both_serving.balancer_url, {"b"})
    with both_serving.client() as client:
        assert {client.get("/readyz").headers["x-replica"] for _ in range(4)} == {"b"}
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{a.url}/readyz", timeout=2)
    a.restart()
    wait_balanced(both_serving.balancer_url, {"a", "b"})
