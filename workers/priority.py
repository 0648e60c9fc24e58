"""The worker's CPU priority on a host it shares with serving (``PM_WORKER_PRIORITY``)."""

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
