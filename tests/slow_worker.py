"""The workers' Celery app with test-only slow-downs: ``celery -A tests.slow_worker worker``.

The fault tests need time to kill a worker, stop the store or write users inside a stage; this
app holds the stage there, for the seconds its environment names (``tests.conftest.Delays``):

- ``TEST_CHUNK_DELAY_S``: before each chunk's users are mapped;
- ``TEST_STAGE_DELAY_S``: once the adapter's training starts (the job's stage says training);
- ``TEST_LOAD_DELAY_S``: in the loading stage, once the members are listed.

Each wait answers cancellation and the stage's time limit, as the stage's own steps do.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

from prompt_migration_client.jobs import Stage

from workers import adapter_training, mapping, pipeline
from workers.celery_app import app
from workers.context import JobRun

__all__ = ["app"]


def wait(job: JobRun, seconds: float) -> None:
    """Sleep, still stopping on cancellation and past the stage's time limit."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        job.check_cancel()
        time.sleep(min(left, 0.25))


def delay(name: str) -> float:
    return float(os.environ.get(f"TEST_{name.upper()}_DELAY_S") or 0)


def before(function: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    """``function(job, ...)``, after ``seconds`` of waiting."""

    @functools.wraps(function)
    def slowed(job: JobRun, *args: Any, **kwargs: Any) -> Any:
        wait(job, seconds)
        return function(job, *args, **kwargs)

    return slowed


def after(function: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    """``function(job, ...)``, then ``seconds`` of waiting."""

    @functools.wraps(function)
    def slowed(job: JobRun, *args: Any, **kwargs: Any) -> Any:
        result = function(job, *args, **kwargs)
        wait(job, seconds)
        return result

    return slowed


def training(function: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    """``function(job, ...)`` (the adapter's training), with the job in its training stage first."""

    @functools.wraps(function)
    def slowed(job: JobRun, *args: Any, **kwargs: Any) -> Any:
        job.update(stage=Stage.training)
        wait(job, seconds)
        return function(job, *args, **kwargs)

    return slowed


# The stages look these names up when they run, so the wrappers take their place.
if chunk := delay("chunk"):
    mapping.map_users = before(mapping.map_users, chunk)
if stage := delay("stage"):
    pipeline.train = training(adapter_training.train, stage)
if load := delay("load"):
    pipeline.member_splits = after(pipeline.member_splits, load)
