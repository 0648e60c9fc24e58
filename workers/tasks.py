"""Celery tasks: thin wiring of the pipeline stages (workers.pipeline holds the logic)."""

from __future__ import annotations

from typing import Any

from celery import chord, group

from app.store import REDIS_DOWN
from workers import pipeline
from workers.celery_app import app

# A Redis outage is transient: retry with backoff; every stage is idempotent.
RETRY = {"autoretry_for": REDIS_DOWN, "retry_backoff": True, "max_retries": 8}


@app.task(name="workers.tasks.train_prompt_set", **RETRY)
def train_prompt_set(job_id: str) -> None:
    pipeline.run_guarded(job_id, pipeline.train_prompt_set)


@app.task(name="workers.tasks.train_stage", **RETRY)
def train_stage(job_id: str) -> None:
    chunks = pipeline.run_guarded(job_id, pipeline.prepare_and_train)
    if chunks is None:
        return
    # Chunks fan out over every worker on the gpu queue; finalize runs once all have answered.
    header = group(map_chunk.si(job_id, index) for index in range(chunks))
    chord(header)(finalize.si(job_id))


@app.task(name="workers.tasks.map_chunk", **RETRY)
def map_chunk(job_id: str, index: int) -> dict[str, Any] | None:
    result: dict[str, Any] | None = pipeline.run_guarded(
        job_id, lambda job: pipeline.map_chunk(job, index)
    )
    return result


@app.task(name="workers.tasks.finalize", **RETRY)
def finalize(job_id: str) -> None:
    pipeline.run_guarded(job_id, pipeline.finalize)
