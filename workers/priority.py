"""How the worker shares a host with serving: its CPU priority (``PM_WORKER_PRIORITY``) and its
torch threads (``PM_MODEL_THREADS``)."""

from __future__ import annotations

import os
from typing import Literal


def yield_to_serving(priority: Literal["idle"] | int) -> None:
    """Lower this process's priority: ``"idle"`` is SCHED_IDLE (on Linux; niceness 19 elsewhere),
    a number a niceness added to the current one. Call it before any thread starts: threads
    inherit it."""
    if priority != "idle":
        os.nice(priority)
    elif hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:
        os.nice(19)


def model_threads(configured: int | None) -> int:
    """``configured``, else one fewer than the cores this process may run on, at least one."""
    if configured is not None:
        return configured
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) - 1)
