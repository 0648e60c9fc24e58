"""The store's contract: sealed versions only, verified writes, atomic switch, grace purge."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from prompt_migration_client import codec

from app.errors import ConflictError, IntegrityError
from app.store import SetMeta, Store
from tests.conftest import seed_set


@pytest.fixture
def client(either_client: TestClient) -> TestClient:
    """Every test here runs on a single Redis and on a Redis Cluster."""
    return either_client


def test_seal_refuses_a_set_that_does_not_verify(store: Store) -> None:
    store.put_model("m-a", {"name": "m-a", "checkpoint": "m-a", "registered_at": 0})
    items = [("u1", b"\0" * 32), ("u2", b"\1" * 32)]
    store.begin_set(SetMeta(model="m-a", version="1", task="rating", shape=[1, 8]))
    store.write_prompts("m-a", "1", items[:1])  # one write lost
    with pytest.raises(IntegrityError):
        store.seal_set("m-a", "1", expected_count=2, expected_digest=codec.set_digest(items))
    assert store.get_meta("m-a", "1").state == "writing"
    with pytest.raises(ConflictError):
        store.activate("m-a", "1")


def test_chunk_digests_combine_to_the_set_digest() -> None:
    items = [(f"u{i}", bytes([i]) * 8) for i in range(10)]
    chunks = [codec.set_digest(items[i : i + 3]) for i in range(0, 10, 3)]
    assert codec.combine_digests(chunks) == codec.set_digest(items)
    assert codec.set_digest(reversed(items)) == codec.set_digest(items)


def test_keys_of_a_set_share_one_hash_tag(store: Store) -> None:
    version, _ = seed_set(store, model="m-a", users=["u1", "u2"])
    keys = [k.decode() for k in store.redis.scan_iter(match="pm:{m-a:*", count=100)]
    assert keys and all(k.startswith(f"pm:{{m-a:{version}}}:") for k in keys)


def test_chunk_completion_counts_once(store: Store) -> None:
    store.redis.hset("pm:{job:j1}", "users_mapped", 0)
    assert store.mark_chunk_done("j1", 0, count=5, digest="00")
    assert not store.mark_chunk_done("j1", 0, count=5, digest="00")
    assert store.redis.hget("pm:{job:j1}", "users_mapped") == b"5"


def test_retired_versions_are_purged_after_grace(store: Store) -> None:
    old, _ = seed_set(store, model="m-a", users=["u1"])
    new, _ = seed_set(store, model="m-a", users=["u1"])
    assert store.purge_retired(grace_s=3600) == []
    assert store.get_prompt("m-a", old, "u1") is not None  # still readable during the grace
    time.sleep(0.01)
    assert store.purge_retired(grace_s=0) == [f"m-a/{old}"]
    assert store.get_prompt("m-a", old, "u1") is None
    assert store.get_prompt("m-a", new, "u1") is not None


def test_erasure_while_a_set_is_written_holds_at_sealing(store: Store) -> None:
    store.put_model("m-e", {"name": "m-e", "checkpoint": "m-e", "registered_at": 0})
    items = [("u1", b"\0" * 32), ("u2", b"\1" * 32), ("u3", b"\2" * 32)]
    store.begin_set(SetMeta(model="m-e", version="1", task="rating", shape=[1, 8]))
    store.write_prompts("m-e", "1", items[:2])
    assert store.erase_user("u1") == 1  # written already: tombstoned, the set still verifies
    assert store.erase_user("u3") == 0  # not written yet: a later chunk's write is undone too
    store.write_prompts("m-e", "1", items[2:])
    meta = store.seal_set("m-e", "1", expected_count=3, expected_digest=codec.set_digest(items))
    assert (meta.state, meta.count, meta.digest) == ("sealed", 1, codec.set_digest(items[1:2]))
    assert store.set_users("m-e", "1") == ["u2"]
    assert store.get_prompts("m-e", "1", ["u1", "u2", "u3"]) == [None, items[1][1], None]
    assert store.get_meta("m-e", "1").count == 1
    assert store.erase_user("u2") == 1  # sealed now: removed at once
    assert store.set_users("m-e", "1") == [] and store.get_meta("m-e", "1").count == 0


def test_onboarding_and_erasure_keep_the_sealed_count_and_digest_current(store: Store) -> None:
    version, held = seed_set(store, model="m-d", users=["u1", "u2"])
    replaced, added = b"\x07" * len(held["u1"]), b"\x08" * len(held["u1"])
    assert store.onboard("m-d", version, "u1", replaced) is False
    assert store.onboard("m-d", version, "u3", added) is True
    assert store.erase_user("u2") == 1
    expected = codec.set_digest([("u1", replaced), ("u3", added)])
    meta = store.get_meta("m-d", version)
    assert (meta.count, meta.digest) == (2, expected)
    assert [m.digest for m in store.list_versions("m-d")] == [expected]


def test_onboarding_refuses_a_set_still_being_written(store: Store) -> None:
    store.put_model("m-w", {"name": "m-w", "checkpoint": "m-w", "registered_at": 0})
    store.begin_set(SetMeta(model="m-w", version="1", task="rating", shape=[1, 8]))
    with pytest.raises(ConflictError, match="not sealed"):
        store.onboard("m-w", "1", "u1", b"\0" * 32)
    assert store.get_prompt("m-w", "1", "u1") is None
