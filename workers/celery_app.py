"""The workers' Celery app: ``celery -A workers.celery_app worker -Q gpu,default --pool solo``.
It is made by ``app.jobs.queue``, which the API uses too."""

from __future__ import annotations

import sys
from typing import Any

import torch
from celery import signals

from app.config import get_settings
from app.jobs.queue import make_celery
from workers.priority import model_threads, yield_to_serving

app = make_celery(get_settings())


@signals.worker_init.connect
def _share_the_host(**_: Any) -> None:
    settings = get_settings()
    yield_to_serving(settings.worker_priority)
    torch.set_num_threads(model_threads(settings.model_threads))
    print(
        f"sharing the host: priority {settings.worker_priority}, "
        f"torch threads for the model stages {torch.get_num_threads()}",
        file=sys.stderr,
        flush=True,
    )
