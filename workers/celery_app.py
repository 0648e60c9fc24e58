"""The workers' Celery app: ``celery -A workers.celery_app worker -Q gpu,default --pool solo``.
It is made by ``app.jobs.queue``, which the API uses too."""

from __future__ import annotations

import os
from typing import Any

from celery import signals

from app.config import get_settings
from app.jobs.queue import make_celery

app = make_celery(get_settings())


@signals.worker_init.connect
def _yield_to_serving(**_: Any) -> None:
    """Lower the worker's priority before it starts a thread (threads inherit it)."""
    priority = get_settings().worker_priority
    if priority != "idle":
        os.nice(priority)
    elif hasattr(os, "SCHED_IDLE"):  # Linux
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:
        os.nice(19)
