"""A worker SIGKILLed in the middle of mapping: after a restart every user is migrated once."""

from __future__ import annotations

from pathlib import Path

from redis import Redis

from tests.conftest import Delays, RedisServer, make_settings, wait_for
from tests.workers.helpers import (
    TARGET,
    assert_exact_set,
    expected_prompts,
    job,
    migrate,
    service_with_source,
    wait_done,
)


def test_killed_worker_resumes_without_losing_or_duplicating_users(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # Short visibility timeout: the killed worker's unacknowledged chunk is redelivered quickly.
    settings = make_settings(
        redis_server,
        chunk_size=3,
        visibility_timeout_s=4,
        restore_interval_s=1,
        lease_ttl_s=3.0,  # the killed worker's chunk lease lapses soon after
    )
    Redis.from_url(settings.redis_url).flushdb()
    worker_log = tmp_path / "worker.log"
    slow = Delays(chunk=1.0)  # room to kill the worker while it maps
    with service_with_source(settings, worker_log, delays=slow) as (client, store, worker, _):
        created = migrate(client)

        def mid_mapping() -> bool:
            record = job(client, created["id"])
            return record["stage"] == "mapping" and record["progress"]["users_mapped"] >= 3

        wait_for(mid_mapping, timeout=120, interval=0.05, what="mapping under way")
        worker.kill()
        partial = job(client, created["id"])
        total = partial["progress"]["users_total"]
        assert 0 < partial["progress"]["users_mapped"] < total
        worker.start()
        done = wait_done(client, created["id"], timeout=180, worker_log=worker_log)
        assert done["state"] == "promoted", done
        assert done["progress"]["users_mapped"] == total
        target = done["target"]
        assert target["model"] == TARGET
        assert_exact_set(store, TARGET, target["version"], expected_prompts(store, created["id"]))
