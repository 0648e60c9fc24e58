"""The workers' Celery app: ``celery -A workers.celery_app worker -Q gpu,default --pool solo``.
It is made by ``app.jobs.queue``, which the API uses too."""

from __future__ import annotations

from app.config import get_settings
from app.jobs.queue import make_celery

app = make_celery(get_settings())
