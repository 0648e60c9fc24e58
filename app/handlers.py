"""Exception handlers: every failure becomes JSON that says what was wrong and what to do."""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ClusterDownError, RedisClusterException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from app.deps import AuthError
from app.errors import ServiceError
from app.metrics import REDIS_ERRORS
from models.errors import MigrationError, UnknownModelError


def _error(status: int, code: str, detail: str, **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": code, "detail": detail, **extra}, status, headers=headers)


async def _service(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return _error(exc.status_code, exc.code, exc.detail)


async def _auth(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, AuthError)
    code = "unauthorized" if exc.status_code == 401 else "forbidden"
    return _error(exc.status_code, code, exc.detail)


async def _migration(_: Request, exc: Exception) -> Response:
    status = 404 if isinstance(exc, UnknownModelError) else 422
    return _error(status, type(exc).__name__, str(exc))


async def _validation(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = [
        {"field": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg", "")}
        for e in exc.errors()
    ]
    summary = "; ".join(f"{p['field']}: {p['problem']}" for p in problems[:5])
    return _error(
        422, "invalid_request", f"Fix these fields and retry: {summary}", problems=problems
    )


async def _redis_down(_: Request, exc: Exception) -> Response:
    REDIS_ERRORS.inc()
    return _error(
        503,
        "redis_unavailable",
        "The prompt store (Redis) is unreachable; retry shortly. Operators: check PM_REDIS_URL "
        "and that Redis is running.",
    )


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    detail = str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"No route {request.method} {request.url.path}; the API is listed at /docs."
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}; see /docs."
    return _error(exc.status_code, "http_error", detail)


def install(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(ServiceError, _service)
    app.add_exception_handler(AuthError, _auth)
    app.add_exception_handler(MigrationError, _migration)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(RedisConnectionError, _redis_down)
    app.add_exception_handler(RedisTimeoutError, _redis_down)
    # A Redis Cluster that lost a node's slots answers CLUSTERDOWN on the nodes still up, and
    # one with no node answering raises RedisClusterException.
    app.add_exception_handler(ClusterDownError, _redis_down)
    app.add_exception_handler(RedisClusterException, _redis_down)


class BodyLimitMiddleware:
    """Pure ASGI middleware: 413 JSON for a declared ``Content-Length`` above ``max_bytes``.

    The app is not called, so nothing is read or stored. Bodies without a length (chunked) are
    checked by the routes that read them.
    """

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, exempt: re.Pattern[str] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt  # paths whose routes stream their body and check their own limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = Headers(scope=scope).get("content-length")
            exempt = self.exempt is not None and self.exempt.fullmatch(scope["path"])
            too_big = length is not None and length.isdigit() and int(length) > self.max_bytes
            if too_big and not exempt:
                detail = f"Body is {length} bytes; the limit is {self.max_bytes}."
                await _error(413, "payload_too_large", detail)(scope, receive, send)
                return
        await self.app(scope, receive, send)
