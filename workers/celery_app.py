"""The workers' Celery app: ``celery -A workers.celery_app worker -Q gpu,default --pool solo``.
It is made by ``app.jobs.queue``, which the API uses too."""

from __future__ import annotations

from typing import Any

from celery import signals

from app.config import get_settings
from app.jobs.queue import make_celery
from workers.priority import yield_to_serving

app = make_celery(get_settings())


@signals.worker_init.connect
def _yield_to_serving(**_: Any) -> None:
    yield_to_serving(get_settings().worker_priority)
