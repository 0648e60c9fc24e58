"""No job is stranded: a stage whose worker keeps dying, a stage past its time limit, and a
store outage longer than the retries each end the job ``failed`` with an error that says why,
and leave no set ``writing``."""

from __future__ import annotations

import shutil
from pathlib import Path

from redis import Redis

from app.dev.local_redis import LocalRedis
from app.errors import NotFoundError
from app.store import Store
from tests.conftest import Delays, RedisServer, make_settings, wait_for
from tests.workers.helpers import TARGET, job, migrate, service_with_source, wait_done

RUNS = 2  # a stage's worker may die this many times


def assert_no_set_left_writing(store: Store, version: str) -> None:
    try:
        meta = store.get_meta(TARGET, version)
    except NotFoundError:
        return
    assert meta.state != "writing", meta


def test_a_stage_whose_worker_dies_every_time_fails_the_job(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = make_settings(
        redis_server,
        visibility_timeout_s=4,  # the killed worker's task comes back soon ...
        restore_interval_s=1,
        lease_ttl_s=3.0,  # ... and finds its lease lapsed
        max_stage_runs=RUNS,
    )
    Redis.from_url(settings.redis_url).flushdb()
    log = tmp_path / "worker.log"
    slow = Delays(stage=30.0)  # training would outlast each run
    with service_with_source(settings, log, delays=slow) as (client, store, worker, _):
        created = migrate(client)
        for run in range(1, RUNS + 1):
            started = lambda run=run: store.counters(created["id"]).get("ran:train", 0) >= run  # noqa: E731
            wait_for(started, timeout=120, interval=0.05, what=f"run {run} of the stage")
            worker.kill()  # as the kernel's OOM killer would, each time the stage runs
            worker.start(wait=False)  # a busy solo worker answers no ping
        done = wait_done(client, created["id"], timeout=120, worker_log=log)
        assert done["state"] == "failed", (done, store.counters(created["id"]))
        assert "stage train was started 2 times and its worker died each time" in done["error"]
        assert store.counters(created["id"])["ran:train"] == RUNS  # not run once more
        assert_no_set_left_writing(store, done["target"]["version"])


def test_a_stage_past_its_time_limit_fails_the_job(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = make_settings(redis_server)
    Redis.from_url(settings.redis_url).flushdb()
    log = tmp_path / "worker.log"
    with service_with_source(settings, log) as (client, store, worker, _):
        worker.stop()  # the source is trained; now a worker whose stages have 3 s each
        worker.settings = make_settings(redis_server, stage_time_limit_s=3.0)
        worker.delays = Delays(stage=60.0)
        worker.start()
        created = migrate(client)
        done = wait_done(client, created["id"], timeout=120, worker_log=log)
        assert done["state"] == "failed", done
        assert "stage train ran past its time limit of 3 s" in done["error"], done
        assert_no_set_left_writing(store, done["target"]["version"])


def test_a_store_outage_longer_than_the_retries_fails_the_job(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # The store on its own server (persistent, as in production), the broker on the tests' one.
    server = LocalRedis(shutil.which("redis-server") or "redis-server", tmp_path, persist=True)
    server.start()
    try:
        settings = make_settings(redis_server, redis_url=server.url(0), store_retries=2)
        log = tmp_path / "worker.log"
        slow = Delays(stage=30.0)  # the store stops while the adapter trains
        with service_with_source(settings, log, delays=slow) as (client, store, _, _):
            created = migrate(client)
            training = lambda: job(client, created["id"])["stage"] == "training"  # noqa: E731
            wait_for(training, timeout=120, interval=0.05, what="the adapter's training")
            server.stop()
            # Once the stage's retries are spent, the job's failure waits for the store.
            gave_up = lambda: "workers.tasks.fail_job[" in log.read_text(errors="replace")  # noqa: E731
            wait_for(gave_up, timeout=120, what="the stage to give up")
            server.start()  # same port, same data
            done = wait_done(client, created["id"], timeout=180, worker_log=log)
            assert done["state"] == "failed", done
            assert "the store (Redis) stayed unreachable through 2 retries" in done["error"]
            assert_no_set_left_writing(store, done["target"]["version"])
    finally:
        server.stop()
