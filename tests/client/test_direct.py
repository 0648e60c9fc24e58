"""The client's direct Redis reads, as the documented read-only ACL user."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from redis import Redis
from redis.exceptions import NoPermissionError, ResponseError

from app.client import NotFound, Unavailable
from app.client.direct import ACL_RULES, CLUSTER_ACL_RULES, DirectReader
from app.store import SetMeta, Store
from app.store.functions import FORMAT, READ, READ_SET
from app.store.keys import ACTIVE, DATASETS, MODELS, SetKeys, job_key
from tests.app.sets import model_set
from tests.conftest import RedisClusterServer, RedisServer, reader

# A bounded loop: it proves the user may run code of its own without wedging the test Redis.
LOOP = "local n = 0 for i = 1, 1000 do n = n + i end return n"


@pytest.fixture
def reader_url(redis_server: RedisServer, store_redis: Redis) -> Iterator[str]:
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
            _, version, (raw,) = await direct.read_raw(["u2"], model="tiny-gemma", version=old)
            assert (version, raw) == (old, old_prompts["u2"].astype("<f4").tobytes())
            with pytest.raises(NotFound, match="no active prompt set"):
                await direct.read(["u1"], model="nope")
            with pytest.raises(NoPermissionError):
                await direct.aredis.set(SetKeys("tiny-gemma", old).value("u1"), b"x")
        finally:
            await direct.aclose()

    asyncio.run(read())


def _unsealed_set(store: Store) -> str:
    """A set still being written, with one value."""
    version = store.allocate_version("tiny-gemma")
    store.begin_set(SetMeta(model="tiny-gemma", version=version, task="rating", shape=[1, 8]))
    store.write_prompts("tiny-gemma", version, [("u1", b"\0" * 32)])
    return version


def test_a_reader_can_run_only_the_service_read(
    client: TestClient, store: Store, store_redis: Redis, reader_url: str
) -> None:
    sealed, _ = model_set(store, seed=1)
    writing = _unsealed_set(store)
    job = job_key("j1")
    store_redis.hset(job, "request", '{"dataset": "/data/secret.csv"}')
    store_redis.hset(DATASETS, "ml", '{"path": "/data/secret.csv"}')
    meta = SetKeys("tiny-gemma", sealed).meta
    attempts: list[tuple[object, ...]] = [
        ("SCRIPT", "LOAD", LOOP),
        ("EVAL", LOOP, "0"),
        ("FUNCTION", "LOAD", "REPLACE", f"#!lua name=mine\nredis.register_function('f', function() {LOOP} end)"),
        ("FCALL", READ, "1", ACTIVE, "tiny-gemma", "", "u1"),
        ("HGETALL", job),
        ("GET", job),
        ("HGET", job, "request"),
        ("HGETALL", DATASETS),
        ("HGET", DATASETS, "ml"),
        ("HGET", MODELS, "tiny-gemma"),
        ("HGETALL", SetKeys("tiny-gemma", writing).meta),
        ("HSET", ACTIVE, "tiny-gemma", writing),
        ("FLUSHALL",),
    ]  # fmt: skip

    with Redis.from_url(reader_url) as as_reader:
        for attempt in attempts:
            with pytest.raises(NoPermissionError):
                as_reader.execute_command(*attempt)
        # The function reads only the set it is asked for, and only when it is sealed.
        for keys in ([meta, job], [meta, DATASETS], [SetKeys("x", "1").meta, job]):
            with pytest.raises(ResponseError):
                as_reader.fcall_ro(READ_SET, len(keys), *keys, "tiny-gemma", sealed)
        unsealed = SetKeys("tiny-gemma", writing)
        for function, keys in ((READ_SET, [unsealed.meta, unsealed.value("u1")]),
                               (FORMAT, [unsealed.meta])):  # fmt: skip
            code, *_ = as_reader.fcall_ro(function, len(keys), *keys, "tiny-gemma", writing)
            assert code == 2
        assert as_reader.fcall_ro(READ, 1, ACTIVE, "tiny-gemma", writing, "u1")[0] == 2
        assert as_reader.fcall_ro(READ, 1, ACTIVE, "tiny-gemma", sealed, "u1")[0] == 3

    async def read_unsealed() -> None:
        direct = DirectReader(reader_url)
        try:
            with pytest.raises(NotFound, match="not sealed"):
                await direct.read_raw(["u1"], model="tiny-gemma", version=writing)
        finally:
            await direct.aclose()

    asyncio.run(read_unsealed())


def test_reads_on_a_redis_cluster_as_the_reader(
    redis_cluster: RedisClusterServer, cluster_client: TestClient
) -> None:
    store: Store = cluster_client.app.state.store  # type: ignore[attr-defined]
    version, prompts = model_set(store, seed=3)
    writing = _unsealed_set(store)
    expected = {u: p.astype("<f4").tobytes() for u, p in prompts.items()}
    rules = (*ACL_RULES, *CLUSTER_ACL_RULES, ">reader-secret")
    for node in redis_cluster.nodes:  # ACL users are per node
        with Redis(port=node.port) as admin:
            admin.execute_command("ACL", "SETUSER", "pm-reader", *rules)
    url = f"redis://pm-reader:reader-secret@127.0.0.1:{redis_cluster.nodes[0].port}"

    async def read() -> None:
        # A fresh client's first commands, all at once: each would discover the nodes.
        direct = DirectReader(url, cluster=True)
        try:
            users = sorted(expected) * 8
            atomic = await asyncio.gather(
                *(direct.read_raw([u], model="tiny-gemma") for u in users)
            )
            assert [values[0] for _, _, values in atomic] == [expected[u] for u in users]
            pinned = await direct.read(["u1"], model="tiny-gemma", version=version)
            assert np.array_equal(pinned.prompts["u1"], prompts["u1"])
            with pytest.raises(NotFound, match="not sealed"):
                await direct.read(["u1"], model="tiny-gemma", version=writing)
            with pytest.raises(NoPermissionError):
                await direct.aredis.script_load(LOOP)
        finally:
            await direct.aclose()

    try:
        asyncio.run(read())
    finally:
        for node in redis_cluster.nodes:
            with Redis(port=node.port) as admin:
                admin.execute_command("ACL", "DELUSER", "pm-reader")


def test_a_reader_is_told_when_the_functions_are_missing(
    client: TestClient, store: Store, store_redis: Redis, reader_url: str
) -> None:
    model_set(store, seed=1)
    store_redis.function_flush()  # a fresh node, or an operator's FUNCTION FLUSH

    async def read() -> object:
        direct = DirectReader(reader_url)
        try:
            return await direct.read(["u1"], model="tiny-gemma")
        finally:
            await direct.aclose()

    with pytest.raises(Unavailable, match="start the API"):
        asyncio.run(read())
    # The API's next read loads them again.
    assert client.post("/prompts/batch", json={"user_ids": ["u1"]},
                       headers=reader()).status_code == 200  # fmt: skip
    asyncio.run(read())
