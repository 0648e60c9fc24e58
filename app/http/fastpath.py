"""The inference hot path, ``GET /users/{id}/prompt`` in raw format, as pure ASGI.

Inference services call this read on every request. Routing, dependency injection and parameter
validation cost FastAPI more CPU than the read itself (bench/README.md, "Serving"), so this
middleware answers the plain raw read before the framework sees it. It is not a second
contract: anything it does not recognise as a well-formed raw read (another format, a parameter
that fails the route's validation) goes on to the route in ``app.http.routes.prompts``, which
documents the endpoint and answers those, and the errors of a read it did take (bad token,
unknown model or user, Redis down) are answered by the app's own exception handlers.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

from fastapi.security.utils import get_authorization_scheme_param
from prompt_migration_client import codec
from starlette.requests import Request
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.errors import NotFoundError
from app.http.deps import token_scope
from app.http.metrics import PROMPTS_SERVED
from app.store import MODEL_NAME_PATTERN, USER_ID_PATTERN, SetFormat, Store

PATH = "/users/{user_id}/prompt"
_PATH = re.compile("/users/(" + USER_ID_PATTERN.strip("^$") + ")/prompt")
_MODEL = re.compile(MODEL_NAME_PATTERN.strip("^$"))
MAX_VERSION_CHARS = 32  # the route's limit on ?version=


def prompt_headers(meta: SetFormat, user: str, digest: str) -> dict[str, str]:
    """The headers of a served prompt: what it is, its digest and an ETag for 304 reuse."""
    return {
        "X-Prompt-User": user,
        "X-Prompt-Model": meta.model,
        "X-Prompt-Version": meta.version,
        "X-Prompt-Shape": ",".join(str(n) for n in meta.shape),
        "X-Prompt-Dtype": meta.dtype,
        "X-Prompt-Digest": f"sha256:{digest}",
        "ETag": f'"{meta.model}.{meta.version}.{digest[:32]}"',
        "Cache-Control": "no-cache",
    }


def etag_matches(if_none_match: str, etag: str) -> bool:
    return etag in {tag.strip() for tag in if_none_match.split(",")}


def _raw_read_params(query_string: bytes) -> tuple[str | None, str | None] | None:
    """(model, version) of a raw read the route would accept as is, else None."""
    query = dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))
    model, version = query.get("model"), query.get("version")
    if query.get("format", "raw") != "raw":
        return None
    if model is not None and not _MODEL.fullmatch(model):
        return None
    if version is not None and len(version) > MAX_VERSION_CHARS:
        return None
    return model, version


class PromptFastPath:
    """Pure ASGI middleware that serves raw prompt reads and passes every other request on."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: Store,
        settings: Settings,
        route: BaseRoute,
        exception_handlers: dict[Any, Any],
    ) -> None:
        self.app = app
        self.store = store
        self.settings = settings
        self.route = route  # the route it stands in for: metrics label the request with its path
        self.exception_handlers = exception_handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            match = _PATH.fullmatch(scope["path"])
            params = _raw_read_params(scope["query_string"]) if match else None
            if match is not None and params is not None:
                scope["route"] = self.route
                try:
                    await self._serve(scope, send, user=match.group(1), params=params)
                except Exception as exc:
                    await self._answer_error(exc, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _serve(
        self, scope: Scope, send: Send, *, user: str, params: tuple[str | None, str | None]
    ) -> None:
        authorization = if_none_match = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"if-none-match":
                if_none_match = value.decode("latin-1")
        scheme, token = get_authorization_scheme_param(authorization)
        token_scope(self.settings, token if scheme.lower() == "bearer" else None)
        meta, (value,) = await self.store.read_prompts(*params, [user])
        if value is None:
            raise NotFoundError(
                f"User {user!r} has no prompt for {meta.model} version {meta.version}; onboard "
                "one with PUT /users/{id}/prompt or migrate the model's users."
            )
        headers = prompt_headers(meta, user, codec.digest(value))
        if if_none_match and etag_matches(if_none_match, headers["ETag"]):
            await _respond(send, status=304, headers=headers, body=b"")
            return
        PROMPTS_SERVED.labels("raw").inc()
        headers["Content-Type"] = "application/octet-stream"
        await _respond(send, status=200, headers=headers, body=value)

    async def _answer_error(
        self, exc: Exception, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Answers ``exc`` with the app's handler for it, as the route's errors are answered."""
        handler = next(
            (self.exception_handlers[c] for c in type(exc).__mro__ if c in self.exception_handlers),
            None,
        )
        if handler is None:
            raise exc
        response = await handler(Request(scope, receive), exc)
        await response(scope, receive, send)


async def _respond(send: Send, *, status: int, headers: dict[str, str], body: bytes) -> None:
    raw = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    if status != 304:
        raw.append((b"content-length", str(len(body)).encode()))
    start: Message = {"type": "http.response.start", "status": status, "headers": raw}
    await send(start)
    await send({"type": "http.response.body", "body": body})
