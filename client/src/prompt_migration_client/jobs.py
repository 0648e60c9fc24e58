"""A job as the API reports it: its states and stages (the service writes them, clients read
them), and following one until it ends."""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    promoted = "promoted"  # a migration whose set is served
    awaiting_promotion = "awaiting_promotion"  # passed the gate; POST .../promote serves it
    gate_failed = "gate_failed"  # sealed, not served: ?force=true promotes it anyway
    succeeded = "succeeded"  # a prompt training
    failed = "failed"
    cancelled = "cancelled"


TERMINAL = frozenset(
    {
        JobState.promoted,
        JobState.awaiting_promotion,
        JobState.gate_failed,
        JobState.succeeded,
        JobState.failed,
        JobState.cancelled,
    }
)


class Stage(StrEnum):
    """What a job is doing now (``stage`` in its record)."""

    queued = "queued"
    loading = "loading"  # reading the sources' users and the dataset
    selecting = "selecting"  # choosing the users the adapter trains on
    fitting = "fitting"  # the instant map (no training)
    training = "training"  # the adapter, or a prompt training's prompts
    mapping = "mapping"  # every user's prompt through the adapter, chunk by chunk
    evaluating = "evaluating"  # test metrics and the quality gate
    sealing = "sealing"  # verifying the written set, then applying writes made during the job
    writing = "writing"  # a prompt training's set
    done = "done"
    promoted = "promoted"
    failed = "failed"
    cancelled = "cancelled"


def follow_job(
    read: Callable[[], dict[str, Any]],
    *,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    interval_s: float = 1.0,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Call ``read`` (one ``GET /migrations/{id}``) until the job ends; returns its last record.
    ``on_update`` sees every record read; past ``timeout_s`` a TimeoutError names the last."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        record = read()
        if on_update is not None:
            on_update(record)
        if record["state"] in TERMINAL:
            return record
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {record.get('id')} had not ended: last record {record}")
        time.sleep(interval_s)
