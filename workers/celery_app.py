"""The Celery app: ``celery -A workers.celery_app worker -Q gpu,default --pool solo``."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from app.config import Settings, get_settings

GPU_QUEUE, DEFAULT_QUEUE = "gpu", "default"
TASKS = "workers.tasks"


def make_celery(settings: Settings) -> Celery:
    celery = Celery("prompt_migration", broker=settings.broker, backend=settings.backend)
    celery.conf.update(
        task_default_queue=DEFAULT_QUEUE,
        task_queues=(Queue(GPU_QUEUE), Queue(DEFAULT_QUEUE)),
        task_routes={
            f"{TASKS}.train_stage": {"queue": GPU_QUEUE},
            f"{TASKS}.map_chunk": {"queue": GPU_QUEUE},
            f"{TASKS}.finalize": {"queue": GPU_QUEUE},
            f"{TASKS}.train_prompt_set": {"queue": GPU_QUEUE},
            f"{TASKS}.promote": {"queue": DEFAULT_QUEUE},
            f"{TASKS}.fail_job": {"queue": DEFAULT_QUEUE},
        },
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
        },
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        result_expires=7 * 86400,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        imports=(TASKS,),
    )
    return celery


app = make_celery(get_settings())
