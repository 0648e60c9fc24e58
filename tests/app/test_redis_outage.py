"""Redis down: 503 with a clear message, never 500; service recovers when Redis is back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis.exceptions import ConnectionError as RedisConnectionError

from app.main import create_app
from tests.conftest import (
    RedisClusterServer,
    RedisServer,
    admin,
    make_settings,
    read_burst_errors,
    reader,
    seed_set,
    wait_for,
)


def test_503_while_redis_is_down_then_recovers(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        app = create_app(make_settings(server))
        with TestClient(app, raise_server_exceptions=False) as client:
            seed_set(app.state.store, model="m-a", users=["u1"])
            assert client.get("/users/u1/prompt", headers=reader()).status_code == 200
            server.stop()
            for method, path in [
                ("GET", "/users/u1/prompt"),
                ("GET", "/models"),
                ("GET", "/migrations"),
                ("POST", "/prompts/batch"),
            ]:
                kwargs: dict[str, Any] = {"json": {"user_ids": ["u1"]}} if method == "POST" else {}
                response = client.request(method, path, headers=reader(), **kwargs)
                assert response.status_code == 503, response.text
                assert "Redis" in response.json()["detail"]
            erase = client.delete("/users/u1", headers=admin())
            assert erase.status_code == 503
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["ready"] is False
            server.start()  # same port, empty data
            seed_set(app.state.store, model="m-a", users=["u1"])
            assert client.get("/users/u1/prompt", headers=reader()).status_code == 200
    finally:
        server.stop()


def test_a_cluster_node_down_is_503_then_recovers(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    cluster = RedisClusterServer(tmp_path, node_timeout_ms=500)
    try:
        cluster.start()
        settings = make_settings(redis_server, redis_url=cluster.url(), redis_cluster=True)
        app = create_app(settings)
        with TestClient(app, raise_server_exceptions=False) as client:
            store = app.state.store
            version, _ = seed_set(store, model="m-a", users=["u1"])
            port = store.redis.get_node_from_key(f"pm:{{m-a:{version}}}:meta").port
            down = next(node for node in cluster.nodes if node.port == port)
            survivor = next(node for node in cluster.nodes if node.port != port)
            down.stop()
            response = client.get("/users/u1/prompt", headers=reader())
            assert response.status_code == 503, response.text  # the set's node is gone
            # Once the others notice, they refuse every slot: CLUSTERDOWN is an outage too.
            wait_for(lambda: cluster.state(survivor) == "fail", timeout=30, what="CLUSTERDOWN")
            response = client.get("/models", headers=reader())
            assert response.status_code == 503, response.text
            assert "Redis" in response.json()["detail"]
            down.start()  # same port and node identity, empty data (no persistence here)
            cluster.wait_ready()
            _, values = seed_set(store, model="m-a", users=["u1", "u2", "u3"])
            # The first reads after an outage rediscover the nodes once, not all at once.
            assert read_burst_errors(client, store, values) == []

            cluster.stop()  # no node answers: still 503, never 500
            for path in ("/users/u1/prompt", "/models", "/readyz"):
                response = client.get(path, headers=reader())
                assert response.status_code == 503, (path, response.text)
            with pytest.raises(RedisConnectionError, match="No node of the Redis Cluster"):
                create_app(settings)  # a Cluster client needs the Cluster at start-up
            for node in cluster.nodes:
                node.start()
            cluster.wait_ready()
            _, values = seed_set(store, model="m-a", users=["u1", "u2", "u3"])
            assert read_burst_errors(client, store, values) == []
    finally:
        cluster.stop()
