"""The worker healthcheck asks one worker by its node name, on a real broker."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

from redis import Redis

from app.config import Settings
from app.jobs.queue import make_celery
from app.store import Store
from tests.conftest import Worker
from workers.health import main, node_name


def test_the_healthcheck_passes_for_the_live_worker_only(
    settings: Settings, store_redis: Redis, start_worker: Callable[[Settings], Worker]
) -> None:
    worker = start_worker(settings)
    celery, store = make_celery(settings), Store(store_redis)
    host = socket.gethostname()
    assert main([f"{worker.name}@{host}"], celery=celery, store=store) == 0
    # Another worker's answer does not count for this one.
    assert main([node_name("no-such-host")], celery=celery, store=store) == 1
    worker.kill()
    assert main([f"{worker.name}@{host}"], celery=celery, store=store) == 1


def test_a_worker_inside_a_leased_stage_counts_as_healthy(
    settings: Settings, store_redis: Redis
) -> None:
    """A solo worker in a stage answers no ping; its lease heartbeat marks its host busy."""
    celery, store = make_celery(settings), Store(store_redis)
    assert main([node_name("gpu-7")], celery=celery, store=store) == 1
    store.mark_busy("gpu-7", holder="gpu-7:12:abcd", ttl_s=30)
    assert main([node_name("gpu-7")], celery=celery, store=store) == 0


def thread_niceness(pid: int) -> list[int]:
    """The nice value of each of the process's threads (field 19 of /proc/<pid>/task/*/stat)."""
    values = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        fields = stat.read_text().rsplit(")", 1)[1].split()
        values.append(int(fields[16]))  # fields after the name start at field 3
    return values


def test_the_worker_runs_below_the_api_and_the_store(
    settings: Settings, start_worker: Callable[[Settings], Worker]
) -> None:
    """On a shared host a migration takes the CPU that serving leaves (PM_WORKER_NICE)."""
    worker = start_worker(settings)
    assert worker.proc is not None
    expected = min(19, os.nice(0) + settings.worker_nice)
    assert settings.worker_nice > 0
    assert set(thread_niceness(worker.proc.pid)) == {expected}
