"""Exception handlers: every failure becomes JSON that says what was wrong and what to do."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security.utils import get_authorization_scheme_param
from prompt_migration_client.errors import FormatError
from redis.exceptions import ClusterDownError, RedisClusterException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.errors import ServiceError
from app.http.deps import AuthError, token_scope
from app.http.metrics import REDIS_ERRORS
from models.errors import MigrationError, UnknownModelError


def _error(status: int, code: str, detail: str, **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": code, "detail": detail, **extra}, status, headers=headers)


async def _service(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return _error(exc.status_code, exc.code, exc.detail)


async def _format(_: Request, exc: Exception) -> Response:
    """A value or set file the caller sent that breaks the wire format (the client's modules)."""
    assert isinstance(exc, FormatError)
    return _error(exc.status, exc.code, exc.detail)


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
    app.add_exception_handler(FormatError, _format)
    app.add_exception_handler(AuthError, _auth)
    app.add_exception_handler(MigrationError, _migration)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(RedisConnectionError, _redis_down)
    app.add_exception_handler(RedisTimeoutError, _redis_down)
    # A Redis Cluster that lost a node's slots answers CLUSTERDOWN on the nodes still up, and
    # one with no node answering raises RedisClusterException.
    app.add_exception_handler(ClusterDownError, _redis_down)
    app.add_exception_handler(RedisClusterException, _redis_down)


class _BodyTooLarge(Exception):
    """Raised by the counting ``receive`` once a body passes its limit."""


@dataclass(frozen=True)
class _Operation:
    """A documented operation that needs a token; ``path`` is the template metrics label it by."""

    path: str
    regex: re.Pattern[str]
    methods: frozenset[str]


def _token_operations(openapi: dict[str, Any]) -> list[_Operation]:
    """The operations of the app's OpenAPI document that need a bearer token (``security``)."""
    operations = []
    for path, methods in openapi.get("paths", {}).items():
        secured = frozenset(m.upper() for m, op in methods.items() if op.get("security"))
        if secured:
            operations.append(_Operation(path, compile_path(path)[0], secured))
    return operations


class _CountedReceive:
    """``receive`` that counts the body as it streams and raises once it passes ``limit``."""

    def __init__(self, receive: Receive, *, limit: int) -> None:
        self.receive = receive
        self.limit = limit
        self.size = 0
        self.over = False

    async def __call__(self) -> Message:
        message = await self.receive()
        if message["type"] == "http.request":
            self.size += len(message.get("body", b""))
            if self.size > self.limit:
                self.over = True
                raise _BodyTooLarge
        return message


class BodyGateMiddleware:
    """Pure ASGI middleware: a request body costs nothing before it is allowed.

    For a request that carries a body (a length above 0, or chunked):

    - to a route that needs a token, a missing or wrong one gets the routes' own 401 before the
      app reads a byte (a read token on an admin route still gets its 403 from the route);
    - the body is counted as it streams, whatever ``Content-Length`` says: past its limit the
      request gets 413 JSON instead of whatever the app would have answered. Paths matching
      ``streamed`` (imports, which stream to disk) have ``PM_MAX_IMPORT_BYTES``, the others
      ``PM_MAX_BODY_BYTES``; a declared length above the limit is refused without calling the
      app.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: Settings,
        openapi: Callable[[], dict[str, Any]],
        streamed: re.Pattern[str] | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.openapi = openapi  # the app's document: which operations need a token
        self.streamed = streamed
        self._operations: list[_Operation] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        if "transfer-encoding" not in headers and length in (None, "0"):
            await self.app(scope, receive, send)  # no body: nothing to read, nothing to gate
            return
        refused = self._refusal(scope, headers)
        if refused is not None:
            await refused(scope, receive, send)
            return
        await self._counted(scope, receive, send)

    def _limit(self, scope: Scope) -> tuple[int, str]:
        """The byte limit of the request's body, and the setting that gives it."""
        if self.streamed is not None and self.streamed.fullmatch(_route_path(scope)):
            return self.settings.max_import_bytes, "PM_MAX_IMPORT_BYTES"
        return self.settings.max_body_bytes, "PM_MAX_BODY_BYTES"

    def _refusal(self, scope: Scope, headers: Headers) -> Response | None:
        """The 401 or 413 answered without calling the app, or None to go on."""
        operation = self._token_operation(scope)
        if operation is not None:
            scope.setdefault("route", operation)  # metrics label the refusal with its path
            scheme, token = get_authorization_scheme_param(headers.get("authorization"))
            try:
                token_scope(self.settings, token if scheme.lower() == "bearer" else None)
            except AuthError as exc:
                return _error(exc.status_code, "unauthorized", exc.detail)
        length, (limit, setting) = headers.get("content-length"), self._limit(scope)
        if length is not None and length.isdigit() and int(length) > limit:
            return _too_large(limit, setting)
        return None

    def _token_operation(self, scope: Scope) -> _Operation | None:
        """The operation the request calls when it needs a token, else None."""
        if self._operations is None:  # the routes are all in place by the first request
            self._operations = _token_operations(self.openapi())
        method, path = scope["method"], _route_path(scope)
        for operation in self._operations:
            if method in operation.methods and operation.regex.match(path):
                return operation
        return None

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app with a counting ``receive``; once the body is over its limit, the app's own
        answer (a parse error, a 500 from the exception) is replaced by the 413."""
        limit, setting = self._limit(scope)
        counted = _CountedReceive(receive, limit=limit)
        started = answered = False

        async def guarded_send(message: Message) -> None:
            nonlocal started, answered
            if counted.over and not started:
                if not answered:
                    answered = True
                    await _too_large(limit, setting)(scope, receive, send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded_send)
        except Exception:
            if not counted.over or started:
                raise
            if not answered:
                await _too_large(limit, setting)(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path the routes match: without the ``root_path`` a proxy mounts the API under."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _too_large(limit: int, setting: str) -> JSONResponse:
    return _error(
        413,
        "payload_too_large",
        f"The body is over the limit of {limit} bytes ({setting}); send a smaller one, or split "
        "it over several requests.",
    )
