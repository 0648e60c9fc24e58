"""The client library's direct Redis reads, timed from one asyncio process.

``raw_client_get`` is a plain GET of a pinned version's value on the same asyncio client, as the
default user (no pointer, no seal check: a reader's ACL does not allow it); ``direct_redis`` is
the client's atomic read, the API's own read function by FCALL_RO. Same process, same
concurrency, same users: their ratio is what the pointer, the seal check and the atomicity cost a
reader that talks to Redis itself. The client is Python, so it is the bound here, as it
would be in an inference service that reads this way.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

import numpy as np
from prompt_migration_client.direct import DirectReader

from app.store import connect_redis_async
from app.store.functions import LIBRARY
from app.store.keys import SetKeys
from bench.loadgen import Load, user_id


async def _drive(
    read: Callable[[str], Awaitable[bool]],
    *,
    users: int,
    concurrency: int,
    seconds: float,
    warmup_s: float,
) -> Load:
    """``concurrency`` loops reading random users until the deadline; the latency of each."""
    latencies: list[float] = []
    errors = 0

    async def loop(worker: int, until: float, record: bool) -> None:
        nonlocal errors
        rng = random.Random(worker)
        while time.perf_counter() < until:
            start = time.perf_counter()
            ok = await read(user_id(rng.randrange(users)))
            if record and ok:
                latencies.append(time.perf_counter() - start)
            elif record:
                errors += 1

    if warmup_s > 0:
        until = time.perf_counter() + warmup_s
        await asyncio.gather(*(loop(w, until, False) for w in range(concurrency)))
    cpu, start = time.process_time(), time.perf_counter()
    until = start + seconds
    await asyncio.gather(*(loop(w, until, True) for w in range(concurrency)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    ms = np.asarray(latencies) * 1e3

    def pct(q: float) -> float:
        return round(float(np.percentile(ms, q)), 3) if len(ms) else 0.0

    return Load(
        requests=len(latencies),
        seconds=elapsed,
        errors=errors,
        latency_ms={
            "mean": round(float(ms.mean()), 3) if len(ms) else 0.0,
            "p50": pct(50),
            "p99": pct(99),
            "p999": pct(99.9),
            "max": round(float(ms.max()), 3) if len(ms) else 0.0,
        },
        cpu_seconds=round(cpu, 2),
    )


async def read_rate(
    redis_url: str,
    *,
    atomic: bool,
    cluster: bool,
    model: str,
    version: str,
    users: int,
    value_bytes: int,
    concurrency: int,
    seconds: float,
    warmup_s: float,
) -> Load:
    """The client's atomic read (``atomic``) or a plain GET of random users of the set."""
    raw = connect_redis_async(redis_url, timeout_s=30, cluster=cluster)
    # What the API does at start-up; this runs before any API has.
    await raw.function_load(LIBRARY, replace=True)
    reader = DirectReader(redis_url, cluster=cluster, timeout_s=30)
    values = SetKeys(model, version).values

    async def plain(user: str) -> bool:
        value = await raw.get(values + user)
        return value is not None and len(value) == value_bytes

    async def through_script(user: str) -> bool:
        _, found, (value,) = await reader.read_raw([user], model=model)
        return found == version and value is not None and len(value) == value_bytes

    try:
        return await _drive(
            through_script if atomic else plain,
            users=users,
            concurrency=concurrency,
            seconds=seconds,
            warmup_s=warmup_s,
        )
    finally:
        await reader.aclose()
        await raw.aclose()
