"""A whole migration on a Redis Cluster: the worker writes, verifies, seals and promotes the set
there, the API serves it from there, and Celery keeps to its own plain Redis."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.store import Store
from tests.conftest import RedisClusterServer, RedisServer, make_settings, reader
from tests.workers.helpers import (
    assert_exact_set,
    expected_prompts,
    migrate,
    service_with_source,
    wait_done,
)


@pytest.fixture(scope="module")
def env(
    redis_server: RedisServer,
    redis_cluster: RedisClusterServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[TestClient, Store]]:
    redis_cluster.flush()
    settings = make_settings(
        redis_server, redis_url=redis_cluster.url(), redis_cluster=True, chunk_size=5
    )
    log = tmp_path_factory.mktemp("cluster-worker") / "worker.log"
    with service_with_source(settings, log) as service:
        yield service.client, service.store


def test_migration_is_sealed_promoted_and_served_on_the_cluster(
    env: tuple[TestClient, Store],
) -> None:
    client, store = env
    done = wait_done(client, migrate(client)["id"])
    assert done["state"] == "promoted", done
    model, version = done["target"]["model"], done["target"]["version"]
    expected = expected_prompts(store, done["id"])
    assert_exact_set(store, model, version, expected)

    cluster: Any = store.redis
    set_keys = list(cluster.scan_iter(match=f"pm:{{{model}:{version}}}:*", count=1000))
    assert len({cluster.keyslot(key) for key in set_keys}) == 1
    # The case a one-script read cannot serve; the names here are fixed, so this always holds.
    registry_node = cluster.get_node_from_key("pm:{registry}:active")
    assert cluster.get_node_from_key(set_keys[0]) != registry_node
    users = sorted(expected)
    body = client.post("/prompts/batch", json={"user_ids": users}, headers=reader()).json()
    assert (body["model"], body["version"]) == (model, version)
    stored = dict(zip(users, store.get_prompts(model, version, users), strict=True))
    assert {u: base64.b64decode(v) for u, v in body["prompts"].items()} == stored
