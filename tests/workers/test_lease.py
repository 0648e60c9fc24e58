"""A stage that runs past the broker's visibility timeout is not started a second time.

Celery's Redis transport delivers an unacknowledged task again once the visibility timeout
passes; a second, idle worker then receives the training stage while the first still runs it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from redis import Redis

from app.config import Settings
from app.store import Store
from tests.conftest import Delays, RedisServer, Worker, make_settings
from tests.workers.helpers import (
    TARGET,
    assert_exact_set,
    expected_prompts,
    migrate,
    service_with_source,
    wait_done,
)


def test_a_redelivered_stage_waits_for_the_live_holder(
    redis_server: RedisServer, tmp_path: Path, start_worker: Callable[..., Worker]
) -> None:
    settings = make_settings(
        redis_server,
        visibility_timeout_s=2,
        restore_interval_s=1,
        lease_ttl_s=2.0,
    )
    Redis.from_url(settings.redis_url).flushdb()
    slow = Delays(stage=8.0)  # training outlasts the visibility timeout several times over
    with service_with_source(settings, tmp_path / "worker-a.log", delays=slow) as (
        client,
        store,
        _,
        _,
    ):
        # idle: it takes the redelivered stage
        start_worker(settings, flush_broker=False, delays=slow)
        created = migrate(client)
        done = wait_done(client, created["id"], timeout=240, worker_log=tmp_path / "worker-a.log")
        assert done["state"] == "promoted", done
        counters = store.counters(created["id"])
        assert counters.get("waited:train", 0) >= 1, counters  # the second delivery came ...
        assert counters["adapter_trainings"] == 1, counters  # ... and did not train again
        expected = expected_prompts(store, created["id"])
        assert_exact_set(store, TARGET, done["target"]["version"], expected)


def test_a_lapsed_lease_passes_to_the_next_holder(settings: Settings, store_redis: Redis) -> None:
    store = Store(store_redis)
    assert store.take_lease("j1", "train", holder="a", ttl_s=0.2)
    assert not store.take_lease("j1", "train", holder="b", ttl_s=0.2)
    assert not store.renew_lease("j1", "train", holder="b", ttl_s=5)
    assert store.renew_lease("j1", "train", holder="a", ttl_s=0.2)
    store.drop_lease("j1", "train", holder="b")  # not b's to drop
    assert store.lease_holder("j1", "train") == "a"
    store_redis.pexpire("pm:{job:j1}:lease:train", 1)  # the holder died: nothing renews it
    while store.lease_holder("j1", "train") is not None:
        pass
    assert store.take_lease("j1", "train", holder="b", ttl_s=5)
    assert not store.renew_lease("j1", "train", holder="a", ttl_s=5)
