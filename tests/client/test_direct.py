"""The client's direct Redis reads, as the documented read-only ACL user whose grants the
service keeps to the readable sets."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prompt_migration_client import NotFound, Unauthorized, Unavailable, codec
from prompt_migration_client.direct import ACL_RULES, CLUSTER_ACL_RULES, DirectReader
from prompt_migration_client.functions import FORMAT, READ, READ_SET
from redis import Redis
from redis.exceptions import NoPermissionError, ResponseError

from app.config import Settings
from app.store import SetMeta, Store
from app.store.keys import ACTIVE, DATASETS, MODELS, SetKeys, job_key
from app.store.reader_acl import ReaderAclError, escape_glob, reader_key_patterns
from tests.app.sets import model_set
from tests.conftest import RedisClusterServer, RedisServer, make_settings, reader, wait_for

# A bounded loop: it proves the user may run code of its own without wedging the test Redis.
LOOP = "local n = 0 for i = 1, 1000 do n = n + i end return n"


READER_USER = "pm-reader"
# The test Redis's sealed value of _unsealed_set's one user.
VALUE = b"\0" * 32


@pytest.fixture
def settings(redis_server: RedisServer) -> Settings:
    """The API grants pm-reader the readable sets, and checks the grants often."""
    return make_settings(redis_server, reader_acl_users=[READER_USER], reader_acl_sync_s=0.2)


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
    store.write_prompts("tiny-gemma", version, [("u1", VALUE)])
    return version


def _seal(store: Store, version: str) -> None:
    store.seal_set(
        "tiny-gemma", version, expected_count=1, expected_digest=codec.set_digest([("u1", VALUE)])
    )


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
        (
            "FUNCTION",
            "LOAD",
            "REPLACE",
            f"#!lua name=mine\nredis.register_function('f', function() {LOOP} end)",
        ),
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
    ]

    with Redis.from_url(reader_url) as as_reader:
        for attempt in attempts:
            with pytest.raises(NoPermissionError):
                as_reader.execute_command(*attempt)
        # The function reads only the set it is asked for, and only when it is sealed.
        for keys in ([meta, job], [meta, DATASETS], [SetKeys("x", "1").meta, job]):
            with pytest.raises(ResponseError):
                as_reader.fcall_ro(READ_SET, len(keys), *keys, "tiny-gemma", sealed)
        # An unsealed set's keys are not granted: the function may not read them either.
        unsealed = SetKeys("tiny-gemma", writing)
        for function, keys in (
            (READ_SET, [unsealed.meta, unsealed.value("u1")]),
            (FORMAT, [unsealed.meta]),
        ):
            with pytest.raises(ResponseError):
                as_reader.fcall_ro(function, len(keys), *keys, "tiny-gemma", writing)
        with pytest.raises(ResponseError):
            as_reader.fcall_ro(READ, 1, ACTIVE, "tiny-gemma", writing, "u1")
        assert as_reader.fcall_ro(READ, 1, ACTIVE, "tiny-gemma", sealed, "u1")[0] == 3

    async def read_unsealed() -> None:
        direct = DirectReader(reader_url)
        try:
            with pytest.raises(Unauthorized, match="not granted"):
                await direct.read_raw(["u1"], model="tiny-gemma", version=writing)
        finally:
            await direct.aclose()

    asyncio.run(read_unsealed())


def _refused(client: Redis, *command: object) -> bool:
    try:
        client.execute_command(*command)
    except NoPermissionError:
        return True
    return False


def test_a_reader_is_granted_the_keys_of_readable_sets_only(
    client: TestClient, store: Store, store_redis: Redis, reader_url: str
) -> None:
    sealed, prompts = model_set(store, seed=1)
    writing = _unsealed_set(store)
    old, new = SetKeys("tiny-gemma", sealed), SetKeys("tiny-gemma", writing)
    with Redis.from_url(reader_url) as as_reader:
        assert as_reader.get(old.value("u1")) == prompts["u1"].astype("<f4").tobytes()
        # Still being written: no GET or HGET by key name, and no read through the function.
        for command in (
            ("GET", new.value("u1")),
            ("HGET", new.meta, "state"),
            ("HGET", new.meta, "doc"),
            ("GET", new.value("ghost")),
        ):
            assert _refused(as_reader, *command), command
        with pytest.raises(ResponseError):
            as_reader.fcall_ro(READ, 1, ACTIVE, "tiny-gemma", writing, "u1")
        # Sealed: readable at once, by the function and by key.
        _seal(store, writing)
        assert as_reader.fcall_ro(READ, 1, ACTIVE, "tiny-gemma", writing, "u1")[3] == VALUE
        assert as_reader.get(new.value("u1")) == VALUE
        # Deleted, or purged once retired: refused again.
        store.delete_set("tiny-gemma", writing)
        assert _refused(as_reader, "GET", new.value("u1"))
        model_set(store, seed=2)  # promoted: ``sealed`` is retired
        assert store.purge_retired(grace_s=0) == [f"tiny-gemma/{sealed}"]
        assert _refused(as_reader, "GET", old.value("u1"))
        assert _refused(as_reader, "HGET", old.meta, "doc")


def test_a_reader_that_lost_its_grants_gets_them_back(
    client: TestClient, store: Store, store_redis: Redis, reader_url: str
) -> None:
    version, prompts = model_set(store, seed=1)
    value_key = SetKeys("tiny-gemma", version).value("u1")
    # What a restarted Redis without an aclfile has: the user's base rules, no set granted.
    store_redis.execute_command("ACL", "SETUSER", READER_USER, *ACL_RULES)
    with Redis.from_url(reader_url) as as_reader:
        # Refused until the API's next check (every 0.2 s here), never granted more.
        wait_for(
            lambda: not _refused(as_reader, "GET", value_key),
            timeout=30,
            what="the API to grant the reader its sets again",
        )
        assert as_reader.get(value_key) == prompts["u1"].astype("<f4").tobytes()


def test_a_set_a_worker_seals_is_granted_at_once(
    monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer, reader_url: str
) -> None:
    """Workers build their store from the same settings, so sealing there grants the set too
    (no API runs here to catch up)."""
    from app.config import get_settings
    from workers import context

    monkeypatch.setenv("PM_REDIS_URL", redis_server.url())
    monkeypatch.setenv("PM_READER_ACL_USERS", READER_USER)
    monkeypatch.setattr(context, "_store", None)
    get_settings.cache_clear()
    try:
        worker_store = context.store()
        worker_store.put_model("tiny-gemma", {"name": "tiny-gemma"})
        version = _unsealed_set(worker_store)
        value_key = SetKeys("tiny-gemma", version).value("u1")
        with Redis.from_url(reader_url) as as_reader:
            assert _refused(as_reader, "GET", value_key)
            _seal(worker_store, version)
            assert as_reader.get(value_key) == VALUE
        worker_store.redis.close()
    finally:
        get_settings.cache_clear()


def test_the_api_refuses_to_start_when_it_may_not_grant_readers(
    redis_server: RedisServer, store_redis: Redis
) -> None:
    from app.main import create_app

    store_redis.execute_command(
        "ACL", "SETUSER", "pm-no-acl", "on", ">svc-secret", "~*", "&*", "+@all", "-@admin"
    )
    url = f"redis://pm-no-acl:svc-secret@127.0.0.1:{redis_server.port}/0"
    settings = make_settings(redis_server, redis_url=url, reader_acl_users=[READER_USER])
    try:
        with (
            pytest.raises(ReaderAclError, match=r"\+acl\|setuser"),
            TestClient(create_app(settings)),
        ):
            pass
    finally:
        store_redis.execute_command("ACL", "DELUSER", "pm-no-acl")


def test_grant_patterns_match_only_their_own_keys() -> None:
    assert escape_glob("a*b?[c]\\") == "a\\*b\\?\\[c\\]\\\\"
    assert reader_key_patterns([("m", "2")]) == [
        "%R~pm:{registry}:active",
        "%R~pm:{m:2}:meta",
        "%R~pm:{m:2}:u:*",
    ]


@pytest.fixture
def managed_cluster_client(
    redis_server: RedisServer, redis_cluster: RedisClusterServer
) -> Iterator[TestClient]:
    """The API on the Redis Cluster, granting pm-reader the readable sets on every node."""
    from app.main import create_app

    redis_cluster.flush()
    settings = make_settings(
        redis_server,
        redis_url=redis_cluster.url(),
        redis_cluster=True,
        reader_acl_users=[READER_USER],
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def test_reads_on_a_redis_cluster_as_the_reader(
    redis_cluster: RedisClusterServer, managed_cluster_client: TestClient
) -> None:
    store: Store = managed_cluster_client.app.state.store  # type: ignore[attr-defined]
    rules = (*ACL_RULES, *CLUSTER_ACL_RULES, ">reader-secret")
    for node in redis_cluster.nodes:  # ACL users are per node
        with Redis(port=node.port) as admin:
            admin.execute_command("ACL", "SETUSER", READER_USER, *rules)
    version, prompts = model_set(store, seed=3)
    writing = _unsealed_set(store)
    expected = {u: p.astype("<f4").tobytes() for u, p in prompts.items()}
    url = f"redis://{READER_USER}:reader-secret@127.0.0.1:{redis_cluster.nodes[0].port}"

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
            with pytest.raises(Unauthorized, match="not granted"):
                await direct.read(["u1"], model="tiny-gemma", version=writing)
            with pytest.raises(NoPermissionError):
                await direct.aredis.get(SetKeys("tiny-gemma", writing).value("u1"))
            assert await direct.aredis.get(SetKeys("tiny-gemma", version).value("u1"))
            with pytest.raises(NoPermissionError):
                await direct.aredis.script_load(LOOP)
        finally:
            await direct.aclose()

    try:
        asyncio.run(read())
    finally:
        for node in redis_cluster.nodes:
            with Redis(port=node.port) as admin:
                admin.execute_command("ACL", "DELUSER", READER_USER)


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
    assert (
        client.post("/prompts/batch", json={"user_ids": ["u1"]}, headers=reader()).status_code
        == 200
    )
    asyncio.run(read())
