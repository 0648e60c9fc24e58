"""How the worker shares a host with serving: its CPU priority (``PM_WORKER_PRIORITY``) and its
torch threads (``PM_MODEL_THREADS``)."""

from __future__ import annotations

import math
import os
from pathlib import Path
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
    """``configured``, else one fewer than the cores this process may use, at least one."""
    if configured is not None:
        return configured
    return max(1, usable_cores() - 1)


def usable_cores() -> int:
    """The cores this process may run on, capped by its cgroup's CPU quota: a container limited
    to two CPUs of a 64-core host (``--cpus 2``, a Kubernetes CPU limit) sees all 64 otherwise."""
    on_affinity = hasattr(os, "sched_getaffinity")
    cores = (len(os.sched_getaffinity(0)) if on_affinity else os.cpu_count()) or 1
    quota = cpu_quota(Path("/sys/fs/cgroup"), Path("/proc/self/cgroup"))
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cpu_quota(cgroup_root: Path, membership: Path) -> float | None:
    """The cores this process's cgroup allows (quota / period), None when it sets no quota:
    cgroup v2's ``cpu.max`` ("200000 100000", or "max 100000") or v1's ``cpu.cfs_quota_us``
    (-1 when unlimited) and ``cpu.cfs_period_us``."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    for line in lines:  # "0::/path" (v2) or "4:cpu,cpuacct:/path" (v1)
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if controllers == "":
            values = _read(cgroup_root / relative / "cpu.max")
        elif "cpu" in controllers.split(","):
            folder = cgroup_root / controllers / relative
            values = [*_read(folder / "cpu.cfs_quota_us"), *_read(folder / "cpu.cfs_period_us")]
        else:
            continue
        if len(values) == 2 and values[0] not in ("max", "-1") and float(values[1]) > 0:
            return float(values[0]) / float(values[1])
    return None


def _read(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []
