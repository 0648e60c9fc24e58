"""Prometheus metrics of the API process."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from prometheus_client import Counter, Histogram

REQUESTS = Counter(
    "pm_http_requests_total", "HTTP requests by route and status.", ["method", "route", "status"]
)
LATENCY = Histogram(
    "pm_http_request_seconds",
    "HTTP request latency by route.",
    ["method", "route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
PROMPTS_SERVED = Counter("pm_prompts_served_total", "User prompts returned.", ["kind"])
REDIS_ERRORS = Counter("pm_redis_unavailable_total", "Requests answered 503: Redis unreachable.")


async def observe(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    start = time.perf_counter()
    response = await call_next(request)
    route = getattr(request.scope.get("route"), "path", "unmatched")
    LATENCY.labels(request.method, route).observe(time.perf_counter() - start)
    REQUESTS.labels(request.method, route, str(response.status_code)).inc()
    return response
