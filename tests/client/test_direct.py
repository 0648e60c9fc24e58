"""The client's direct Redis reads, as a read-only ACL user."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fastapi.testclient import TestClient
from redis import Redis
from redis.exceptions import NoPermissionError

from app.client import NotFound
from app.client.direct import ACL_RULES, DirectReader
from app.store import Store
from tests.app.sets import model_set
from tests.conftest import RedisClusterServer, RedisServer


@pytest.fixture
def reader_url(redis_server: RedisServer, store_redis: Redis) -> object:
    store_redis.execute_command("ACL", "SETUSER", "pm-reader", *ACL_RULES, ">reader-secret")
    yield f"redis://pm-reader:reader-secret@127.0.0.1:{redis_server.port}/0"
    store_redis.execute_command("ACL", "DELUSER", "pm-reader")


def test_direct_reads_match_the_api_with_read_only_rights(
    client: TestClient, store: Store, reader_url: str
) -> None:
    old, old_prompts = model_set(store, seed=1)
    new, new_prompts = model_set(store, seed=2)

    async def read() -> None:
        direct = DirectReader(reader_url)
        try:
            batch = await direct.read(["u1", "ghost"], model="tiny-gemma")
            assert (batch.version, batch.missing) == (new, ["ghost"])
            assert np.array_equal(batch.prompts["u1"], new_prompts["u1"])
            pinned = await direct.read(["u2"], model="tiny-gemma", version=old)
            assert np.array_equal(pinned.prompts["u2"], old_prompts["u2"])
            raw = await direct.get("u2", model="tiny-gemma", version=old)
            assert raw == old_prompts["u2"].astype("<f4").tobytes()
            with pytest.raises(NotFound, match="register it first"):
                await direct.read(["u1"], model="nope")
            assert direct.store.aredis is not None
            with pytest.raises(NoPermissionError):
                await direct.store.aredis.set("pm:{tiny-gemma:1}:u:u1", b"x")
        finally:
            await direct.aclose()

    asyncio.run(read())


def test_concurrent_first_reads_on_a_redis_cluster(
    redis_cluster: RedisClusterServer, cluster_client: TestClient
) -> None:
    store: Store = cluster_client.app.state.store  # type: ignore[attr-defined]
    version, prompts = model_set(store, seed=3)
    expected = {u: p.astype("<f4").tobytes() for u, p in prompts.items()}

    async def read() -> None:
        # A fresh client's first commands, all at once: each would discover the nodes.
        direct = DirectReader(redis_cluster.url(), cluster=True)
        try:
            users = sorted(expected) * 8
            plain = await asyncio.gather(
                *(direct.get(u, model="tiny-gemma", version=version) for u in users)
            )
            assert plain == [expected[u] for u in users]
            atomic = await asyncio.gather(
                *(direct.read_raw([u], model="tiny-gemma") for u in users)
            )
            assert [values[0] for _, _, values in atomic] == [expected[u] for u in users]
        finally:
            await direct.aclose()

    asyncio.run(read())
