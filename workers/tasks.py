"""Celery tasks: thin wiring of the stages (workers.pipeline lists them in order)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import Task, chord, group
from celery.utils.time import get_exponential_backoff_interval

from app.config import get_settings
from app.jobs.queue import DEFAULT_QUEUE, TaskName
from app.store import REDIS_DOWN
from workers import follow as following
from workers import pipeline
from workers.celery_app import app
from workers.context import store
from workers.lease import LeaseHeld

log = logging.getLogger(__name__)


class Stage(Task):
    """A stage's task: once its retries through a store outage are spent (see ``leased``), its
    job is failed by ``fail_job``, which waits for the store to answer again, so that the job
    does not stay ``running`` with its set ``writing``."""

    def on_failure(
        self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: ExceptionInfo
    ) -> None:
        if not isinstance(exc, REDIS_DOWN):
            return  # run_guarded already recorded why the job failed
        error = (
            f"the store (Redis) stayed unreachable through {get_settings().store_retries} "
            f"retries of stage {self.name.rsplit('.', 1)[-1]} ({exc}); the job was abandoned. "
            "Check Redis (PM_REDIS_URL), then start the job again."
        )
        try:
            fail_job.apply_async(args=[args[0], error], queue=DEFAULT_QUEUE)
        except Exception:  # the broker is down too: the unacknowledged task comes back instead
            log.exception("could not send fail_job for job %s", args[0])


def leased(
    task: Task, job_id: str, stage: Callable[[pipeline.JobRun], Any], *, lease: str, outages: int
) -> Any:
    """Run ``stage`` under its lease; a delivery that finds it held comes back later, for as
    long as a live worker holds it. A store outage is retried with backoff (every stage is
    idempotent), ``PM_STORE_RETRIES`` times, counted apart from the lease's waits."""
    try:
        return pipeline.run_guarded(job_id, stage, lease=lease)
    except LeaseHeld as held:
        settings = get_settings()
        wait = max(1.0, min(settings.lease_ttl_s, settings.visibility_timeout_s / 2))
        # Always one more try (None would mean the task's own limit): a live holder renews its
        # lease for as long as its stage runs, and a dead one's lapses within its TTL.
        retries = task.request.retries + 1
        raise task.retry(exc=held, countdown=wait, max_retries=retries) from held
    except REDIS_DOWN as down:
        if outages >= get_settings().store_retries:
            raise  # Stage.on_failure fails the job
        countdown = get_exponential_backoff_interval(
            factor=1, retries=outages, maximum=600, full_jitter=True
        )
        kwargs = {**(task.request.kwargs or {}), "outages": outages + 1}
        retries = task.request.retries + 1
        raise task.retry(
            exc=down, countdown=countdown, max_retries=retries, kwargs=kwargs
        ) from down


@app.task(name=TaskName.train_prompt_set, base=Stage, bind=True)
def train_prompt_set(self: Task, job_id: str, outages: int = 0) -> None:
    leased(self, job_id, pipeline.train_prompt_set, lease="train_prompts", outages=outages)


@app.task(name=TaskName.train_stage, base=Stage, bind=True)
def train_stage(self: Task, job_id: str, outages: int = 0) -> None:
    def dispatch(chunks: int) -> None:
        # Chunks fan out over every worker on the gpu queue; finalize runs once all answered.
        header = group(map_chunk.si(job_id, index) for index in range(chunks))
        chord(header)(finalize.si(job_id))

    stage = lambda job: pipeline.train_and_dispatch(job, dispatch=dispatch)  # noqa: E731
    leased(self, job_id, stage, lease="train", outages=outages)


@app.task(name=TaskName.map_chunk, base=Stage, bind=True)
def map_chunk(self: Task, job_id: str, index: int, outages: int = 0) -> dict[str, Any] | None:
    stage = lambda job: pipeline.map_chunk(job, index)  # noqa: E731
    result: dict[str, Any] | None = leased(
        self, job_id, stage, lease=f"chunk:{index}", outages=outages
    )
    return result


@app.task(name=TaskName.finalize, base=Stage, bind=True)
def finalize(self: Task, job_id: str, outages: int = 0) -> None:
    leased(self, job_id, pipeline.finalize, lease="finalize", outages=outages)


# Retried until the store answers again, at most a minute apart: only then can the job be failed.
@app.task(
    name=TaskName.fail_job,
    autoretry_for=REDIS_DOWN,
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=None,
)
def fail_job(job_id: str, error: str) -> None:
    pipeline.fail(job_id, error=error)


@app.task(name=TaskName.follow, bind=True)
def follow(self: Task, job_id: str) -> int:
    """Apply the writes pending for a migration's target (workers/follow.py). Retried while
    another drain holds the set (its worker may have died: its lease lapses) and through a
    store outage; the pending users stay recorded either way."""
    settings = get_settings()
    try:
        return following.follow(store(), job_id, batch=settings.follow_batch)
    except LeaseHeld as held:
        tries = int(settings.lease_ttl_s) + 2  # one a second, until a dead holder's lease lapses
        if self.request.retries >= tries:
            raise
        raise self.retry(exc=held, countdown=1.0, max_retries=tries) from held
    except REDIS_DOWN as down:
        countdown = get_exponential_backoff_interval(
            factor=1, retries=self.request.retries, maximum=60, full_jitter=True
        )
        raise self.retry(
            exc=down, countdown=countdown, max_retries=settings.store_retries
        ) from down
