"""Celery tasks: thin wiring of the stages (workers.pipeline lists them in order)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Task, chord, group

from app.config import get_settings
from app.store import REDIS_DOWN
from workers import pipeline
from workers.celery_app import app
from workers.lease import LeaseHeld

# A Redis outage is transient: retry with backoff; every stage is idempotent.
RETRY = {"autoretry_for": REDIS_DOWN, "retry_backoff": True, "max_retries": 8, "bind": True}


def leased(task: Task, job_id: str, stage: Callable[[pipeline.Job], Any], *, lease: str) -> Any:
    """Run ``stage`` under its lease; a delivery that finds it held comes back later, for as
    long as a live worker holds it."""
    try:
        return pipeline.run_guarded(job_id, stage, lease=lease)
    except LeaseHeld as held:
        settings = get_settings()
        wait = max(1.0, min(settings.lease_ttl_s, settings.visibility_timeout_s / 2))
        # Always one more try (None would mean the task's own limit): a live holder renews its
        # lease for as long as its stage runs, and a dead one's lapses within its TTL.
        retries = task.request.retries + 1
        raise task.retry(exc=held, countdown=wait, max_retries=retries) from held


@app.task(name="workers.tasks.train_prompt_set", **RETRY)
def train_prompt_set(self: Task, job_id: str) -> None:
    leased(self, job_id, pipeline.train_prompt_set, lease="train_prompts")


@app.task(name="workers.tasks.train_stage", **RETRY)
def train_stage(self: Task, job_id: str) -> None:
    def dispatch(chunks: int) -> None:
        # Chunks fan out over every worker on the gpu queue; finalize runs once all answered.
        header = group(map_chunk.si(job_id, index) for index in range(chunks))
        chord(header)(finalize.si(job_id))

    stage = lambda job: pipeline.train_and_dispatch(job, dispatch=dispatch)  # noqa: E731
    leased(self, job_id, stage, lease="train")


@app.task(name="workers.tasks.map_chunk", **RETRY)
def map_chunk(self: Task, job_id: str, index: int) -> dict[str, Any] | None:
    stage = lambda job: pipeline.map_chunk(job, index)  # noqa: E731
    result: dict[str, Any] | None = leased(self, job_id, stage, lease=f"chunk:{index}")
    return result


@app.task(name="workers.tasks.finalize", **RETRY)
def finalize(self: Task, job_id: str) -> None:
    leased(self, job_id, pipeline.finalize, lease="finalize")
