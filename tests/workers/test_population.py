"""A migration's population read a batch at a time: bounded seeded samples, and a plan stored
chunk by chunk (against the real test Redis, no worker needed)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from redis import Redis

from app.config import Settings
from app.store import SetMeta, Store
from tests.conftest import STORE_DB, RedisServer, make_settings
from workers import context
from workers.context import JobRun
from workers.mapping import plan_users
from workers.population import draw, sample, scan_common


@pytest.fixture
def plain(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    client = Redis.from_url(redis_server.url(STORE_DB))
    client.flushdb()
    store = Store(client)
    monkeypatch.setattr(context, "_store", store)  # the stages' store
    yield store
    client.close()


def _source(store: Store, model: str, users: list[str]) -> dict[str, str]:
    """A set listing ``users`` in the order given (values are not needed to plan or sample)."""
    store.begin_set(SetMeta(model=model, version="1", task="rating", shape=[1, 2]))
    for start in range(0, len(users), 500):
        store.redis.sadd(f"pm:{{{model}:1}}:users", *users[start : start + 500])
    return {"model": model, "version": "1"}


def _job(store: Store, sources: list[dict[str, str]], settings: Settings) -> JobRun:
    job_id = uuid.uuid4().hex
    request = {"sources": sources, "target": "t", "dataset": "synthetic-tiny"}
    record = {
        "id": job_id,
        "kind": "migration",
        "state": "running",
        "request": request,
        "sources": sources,
        "target": {"model": "t", "version": "1"},
        "created_at": time.time(),
    }
    store.create_job(record, idempotency_key=None, request_hash="")
    return JobRun(job_id, settings=settings)


def test_a_sample_is_bounded_and_the_same_whatever_the_listing_order(plain: Store) -> None:
    users = [f"user-{i}" for i in range(5000)]
    forward = _source(plain, "m-fwd", users)
    backward = _source(plain, "m-back", users[::-1])
    drawn = [
        draw(plain, [s], limit=300, seed=3, can_train=lambda u: u.endswith("7"))
        for s in (forward, backward)
    ]
    assert drawn[0] == drawn[1]
    assert drawn[0].population == 5000
    assert len(drawn[0].statistics) == 300 and drawn[0].statistics == sorted(drawn[0].statistics)
    assert len(drawn[0].trainable) == 300 and all(u.endswith("7") for u in drawn[0].trainable)
    assert sample(users, limit=300, seed=3) == drawn[0].statistics
    assert sample(users, limit=300, seed=4) != drawn[0].statistics  # the seed picks the sample
    # A population within the limit is the sample: every user, in sorted order.
    assert sample(users[:40], limit=300, seed=3) == sorted(users[:40])


def test_common_users_stream_in_batches(plain: Store) -> None:
    a = _source(plain, "m-a", [f"u{i}" for i in range(3000)])
    b = _source(plain, "m-b", [f"u{i}" for i in range(0, 6000, 2)])
    batches = list(scan_common(plain, [a, b]))
    assert len(batches) > 1 and max(len(batch) for batch in batches) <= 1100
    assert sorted({u for batch in batches for u in batch}) == sorted(
        f"u{i}" for i in range(0, 3000, 2)
    )


def test_the_plan_is_stored_chunk_by_chunk_and_each_user_planned_once(
    plain: Store, redis_server: RedisServer
) -> None:
    users = [f"u{i:05d}" for i in range(2500)]
    source = _source(plain, "m-p", users)
    job = _job(plain, [source], make_settings(redis_server, chunk_size=1000))
    assert plan_users(job, sources=[source]) == 2500
    chunks = [plain.plan_chunk(job.id, i) for i in range(plain.plan_size(job.id))]
    assert [len(c) for c in chunks] == [1000, 1000, 500]
    assert sorted(u for c in chunks for u in c) == users
    assert plain.redis.type(f"pm:{{job:{job.id}}}:plan") == b"hash"
    assert plain.get_blob(job.id, "plan") is None  # no blob of every id
    # A repeated pass (a re-delivered stage, a late users' round) adds only the new users.
    assert plan_users(job, sources=[source]) == 0
    plain.redis.sadd("pm:{m-p:1}:users", "late-1", "late-2")
    assert plan_users(job, sources=[source]) == 2
    assert plain.plan_size(job.id) == 4
    assert sorted(plain.plan_chunk(job.id, 3)) == ["late-1", "late-2"]
    assert plain.planned_users(job.id) == 2502
