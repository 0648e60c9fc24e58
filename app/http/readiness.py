"""``GET /readyz``'s check, made safe to call as often as probes like.

A Celery ping borrows a broker connection and a worker thread for up to its timeout; probes that
arrive together would each start one, exhaust the broker's connection pool and the thread pool
that every synchronous route runs on, and wedge the API. So one check runs at a time, in one
dedicated thread, and its answer is shared with every probe that arrives within ``fresh_s``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from anyio import CapacityLimiter, fail_after, to_thread
from celery import Celery

from app.store import REDIS_DOWN, Store


@dataclass(frozen=True)
class Readiness:
    ready: bool
    checks: dict[str, Any]  # "redis": "ok" or why not; "workers": how many answered, or why none


@dataclass
class ReadinessProbe:
    store: Store
    celery: Celery
    ping_timeout_s: float = 1.0  # how long workers get to answer a ping
    fresh_s: float = 1.0  # probes within this long of a check share its answer
    _last: tuple[float, Readiness] | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _thread: CapacityLimiter = field(default_factory=lambda: CapacityLimiter(1))

    async def check(self) -> Readiness:
        async with self._lock:
            if self._last is not None and time.monotonic() - self._last[0] < self.fresh_s:
                return self._last[1]
            checks = {"redis": await self._redis(), "workers": await self._workers()}
            ready = checks["redis"] == "ok" and isinstance(checks["workers"], int)
            self._last = (time.monotonic(), Readiness(ready=ready, checks=checks))
            return self._last[1]

    async def _redis(self) -> str:
        assert self.store.aredis is not None
        try:
            return "ok" if await self.store.aredis.ping() else "no answer"
        except REDIS_DOWN as exc:
            return f"unreachable: {exc}"

    async def _workers(self) -> int | str:
        ping = self.celery.control.ping
        try:
            # The ping's own timeout bounds it when the broker answers; the outer one when the
            # broker itself hangs (the thread is then left to finish, and no other starts).
            with fail_after(self.ping_timeout_s + 2.0):
                replies = await to_thread.run_sync(
                    lambda: ping(timeout=self.ping_timeout_s), limiter=self._thread
                )
        except TimeoutError:
            return "broker did not answer in time"
        except Exception as exc:  # the broker itself may be down
            return f"broker unreachable: {exc}"
        return len(replies) if replies else "no worker answered"
