"""The store's side of following, on a single Redis and on a Redis Cluster: a write records
the user for each follower atomically, and applying changes keeps the follower's count and
digest, skips older writes and hands the change on to the follower's own followers."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prompt_migration_client import codec

from app.store import Change, Store
from tests.conftest import seed_set


@pytest.fixture
def client(either_client: TestClient) -> TestClient:
    return either_client


def test_writes_are_pending_for_followers_and_applied_in_stamp_order(store: Store) -> None:
    source, held = seed_set(store, model="src", users=["u1", "u2"])
    follower, mapped = seed_set(store, model="dst", users=["u1", "u2"], seed=1, activate=False)
    chained, _ = seed_set(store, model="dst2", users=["u1", "u2"], seed=2)
    store.follow(follower=("dst", follower), followed=[("src", source)], job_id="j1")
    store.follow(follower=("dst2", chained), followed=[("dst", follower)], job_id="j2")
    created, followers = store.onboard_followed("src", source, "u3", held["u1"])
    assert created and [f.job_id for f in followers] == ["j1"]
    erased, followers = store.erase_user_followed("u2")
    assert erased == 3 and {f.job_id for f in followers} == {"j1", "j2"}
    pending = store.pending_users(("src", source), ("dst", follower), count=10)
    assert sorted(pending) == ["u2", "u3"]

    new = b"\x05" * len(held["u1"])
    stamp = pending["u3"]
    applied = store.apply_followed(
        "dst", follower, [Change("u3", new, stamp), Change("u2", None, pending["u2"])]
    )
    assert (applied.created, applied.removed) == (1, 0)  # u2 was erased from dst already
    assert [f.job_id for f in applied.followers] == ["j2"]
    assert store.pending_users(("dst", follower), ("dst2", chained), count=10).keys() >= {"u3"}
    older = store.apply_followed("dst", follower, [Change("u3", b"\x06" * len(new), stamp - 1)])
    assert (older.created, older.removed) == (0, 0)
    assert store.get_prompt("dst", follower, "u3") == new
    meta = store.get_meta("dst", follower)
    assert meta.count == 2
    assert meta.digest == codec.set_digest([("u1", mapped["u1"]), ("u3", new)])

    store.onboard("src", source, "u3", held["u2"])  # a newer write: stays pending on ack
    store.ack_pending(("src", source), ("dst", follower), pending)
    assert list(store.pending_users(("src", source), ("dst", follower), count=10)) == ["u3"]
    assert store.claim_wake("dst", follower, ttl_s=5)
    assert not store.claim_wake("dst", follower, ttl_s=5)
    store.clear_wake("dst", follower)
    assert store.has_pending("dst", follower)

    store.delete_set("dst", follower)  # the follower goes: its relations and pending go too
    assert store.followers("src", source) == []
    assert not store.has_pending("dst", follower)
    assert store.followed_sets("dst2", chained) == []
