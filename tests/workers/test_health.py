"""The worker healthcheck asks one worker by its node name, on a real broker."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from functools import partial
from pathlib import Path

from redis import Redis

from app.config import Settings
from app.jobs.queue import make_celery
from app.store import Store
from tests.conftest import Worker, wait_for
from workers.health import main, node_name
from workers.priority import usable_cores


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


def thread_stats(pid: int) -> list[list[str]]:
    """Each of the process's threads' /proc stat fields, from field 3 (the state) on."""
    return [
        stat.read_text().rsplit(")", 1)[1].split()
        for stat in Path(f"/proc/{pid}/task").glob("*/stat")
    ]


def thread_niceness(pid: int) -> set[int]:
    return {int(fields[16]) for fields in thread_stats(pid)}  # field 19


def thread_policies(pid: int) -> set[int]:
    return {int(fields[38]) for fields in thread_stats(pid)}  # field 41


def test_the_worker_runs_only_on_cpu_the_api_and_the_store_leave(
    settings: Settings, start_worker: Callable[[Settings], Worker]
) -> None:
    """On a shared host a migration takes the CPU that serving leaves (PM_WORKER_PRIORITY)."""
    assert settings.worker_priority == "idle"
    worker = start_worker(settings)
    assert worker.proc is not None
    assert thread_policies(worker.proc.pid) == {os.SCHED_IDLE}


def test_a_niceness_keeps_the_worker_a_share_instead(
    settings: Settings, start_worker: Callable[[Settings], Worker]
) -> None:
    worker = start_worker(settings.model_copy(update={"worker_priority": 7}))
    assert worker.proc is not None
    assert thread_policies(worker.proc.pid) == {os.SCHED_OTHER}
    assert thread_niceness(worker.proc.pid) == {min(19, os.nice(0) + 7)}


def test_the_model_stages_leave_a_core_to_serving_unless_told_their_threads(
    settings: Settings, start_worker: Callable[[Settings], Worker]
) -> None:
    cores = usable_cores()
    default = start_worker(settings.model_copy(update={"model_threads": None}))
    told = start_worker(settings.model_copy(update={"model_threads": 3}))
    expected = {default: max(1, cores - 1), told: 3}
    for worker, threads in expected.items():
        line = wait_for(partial(start_up_line, worker), timeout=30, what="its start-up line")
        assert line.endswith(f"torch threads for the model stages {threads}"), line


def start_up_line(worker: Worker) -> str | None:
    lines = worker.log.read_text().splitlines()
    return next((line for line in lines if "sharing the host" in line), None)
