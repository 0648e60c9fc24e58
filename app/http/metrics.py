"""Prometheus metrics of the API process."""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


class MetricsMiddleware:
    """Pure ASGI middleware: latency and count of each HTTP request by route and status.

    The route label is the route's path template (``/users/{user_id}/prompt``), which the router
    stores in the shared scope; requests no route matched count as ``unmatched``. An exception
    that escapes the app counts as status 500 (the server answers 500) and is re-raised.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            LATENCY.labels(method, route).observe(time.perf_counter() - start)
            REQUESTS.labels(method, route, str(status)).inc()
