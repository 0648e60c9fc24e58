"""The task queue the API and the workers share: the Celery application, its queues and every
task's name, written once. The API sends tasks by these names; ``workers.tasks`` defines them."""

from __future__ import annotations

import sys
from enum import StrEnum

from celery import Celery
from kombu import Queue

from app.config import Settings

GPU_QUEUE, DEFAULT_QUEUE = "gpu", "default"


class TaskName(StrEnum):
    train_prompt_set = "workers.tasks.train_prompt_set"
    train_stage = "workers.tasks.train_stage"
    map_chunk = "workers.tasks.map_chunk"
    finalize = "workers.tasks.finalize"
    fail_job = "workers.tasks.fail_job"
    follow = "workers.tasks.follow"


# Stages that run a model go to the GPU workers; bookkeeping goes anywhere.
ROUTES = {
    TaskName.train_prompt_set: GPU_QUEUE,
    TaskName.train_stage: GPU_QUEUE,
    TaskName.map_chunk: GPU_QUEUE,
    TaskName.finalize: GPU_QUEUE,
    TaskName.fail_job: DEFAULT_QUEUE,
    # A migrated set applying its sources' writes: light, and not to wait behind a training.
    TaskName.follow: DEFAULT_QUEUE,
}


def worker_command(*, app: str = "workers.celery_app", node: str) -> list[str]:
    """The command line of one worker process on both queues: the solo pool, since CUDA does not
    survive a fork. ``node`` names it (``name@%h``)."""
    queues = ",".join((GPU_QUEUE, DEFAULT_QUEUE))
    return [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queues, "--pool", "solo",
            "--loglevel", "INFO", "-n", node]  # fmt: skip


def make_celery(settings: Settings) -> Celery:
    celery = Celery("prompt_migration", broker=settings.broker, backend=settings.backend)
    celery.conf.update(
        task_default_queue=DEFAULT_QUEUE,
        task_queues=(Queue(GPU_QUEUE), Queue(DEFAULT_QUEUE)),
        task_routes={str(name): {"queue": queue} for name, queue in ROUTES.items()},
        # The solo pool enforces no time limit: each stage checks its own (Job.check_cancel).
        # A pool that does enforce these ends a stage a little after that check would have.
        task_soft_time_limit=settings.stage_time_limit_s + 60,
        task_time_limit=settings.stage_time_limit_s + 300,
        # A task is acknowledged only after it ran; a killed worker's task is delivered again
        # (a bounded number of times: workers.lease.check_runs).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": settings.restore_interval_s,
            "unacked_restore_throttle": 1,
            # A worker killed while it restores unacknowledged messages keeps their lock until it
            # expires (kombu's default: 300 s); a short one lets the next worker restore them.
            "unacked_mutex_expire": max(10, 3 * settings.restore_interval_s),
        },
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        result_expires=7 * 86400,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        imports=("workers.tasks",),
    )
    return celery
