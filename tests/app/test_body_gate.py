"""A request body costs nothing before it is allowed: the token comes first, and every body is
counted as it streams, chunked or not."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from starlette.types import ASGIApp, Message

from app.main import create_app
from app.store import Store
from tests.conftest import RedisServer, admin, make_settings, reader, seed_set

CHUNK = b"x" * 16 * 1024
LIMIT = 64 * 1024  # tests.conftest.make_settings' max_body_bytes


@dataclass
class Sent:
    """What the app answered to a chunked body it was offered chunk by chunk."""

    status: int = 0
    body: bytes = b""
    chunks_read: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


def _chunked(
    client: TestClient, path: str, *, headers: dict[str, str], chunks: int, method: str = "POST"
) -> Sent:
    """``path`` called on the app itself with a chunked body of ``chunks`` chunks, counting the
    chunks the app asked for (the test client would read the whole body first)."""
    app: ASGIApp = client.app
    sent = Sent()
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    raw += [(b"transfer-encoding", b"chunked"), (b"content-type", b"application/json")]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": raw,
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
        "state": {},
    }

    async def receive() -> Message:
        if sent.chunks_read >= chunks:
            return {"type": "http.disconnect"}
        sent.chunks_read += 1
        return {"type": "http.request", "body": CHUNK, "more_body": sent.chunks_read < chunks}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            sent.status = message["status"]
            sent.headers = dict(message.get("headers", []))
        elif message["type"] == "http.response.body":
            sent.body += message.get("body", b"")

    async def call() -> None:
        await app(scope, receive, send)

    assert client.portal is not None
    client.portal.call(call)
    return sent


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("POST", "/prompts/batch", {}),
        ("POST", "/prompts/batch", {"Authorization": "Bearer wrong-token"}),
        ("POST", "/prompts/batch", {"Authorization": "Basic dXNlcjpwYXNz"}),
        ("PUT", "/users/u1/prompt", {}),
        ("POST", "/models/m-a/import", {}),
        ("POST", "/migrations", {}),
    ],
)
def test_no_valid_token_is_refused_before_a_byte_is_read(
    client: TestClient, method: str, path: str, headers: dict[str, str]
) -> None:
    sent = _chunked(client, path, headers=headers, chunks=1000, method=method)
    assert sent.status == 401, sent.body
    assert sent.chunks_read == 0
    assert sent.json()["error"] == "unauthorized"
    assert sent.headers[b"www-authenticate"] == b"Bearer"
    assert sent.json() == client.get("/models", headers=headers).json()  # the routes' own 401


def test_chunked_body_over_the_limit_gets_413_as_it_streams(
    client: TestClient, store: Store
) -> None:
    seed_set(store, model="m-a", users=["u1"])
    over = LIMIT // len(CHUNK) + 1
    for token in (reader(), admin()):
        sent = _chunked(client, "/prompts/batch", headers=token, chunks=1000)
        assert sent.status == 413, sent.body
        assert sent.chunks_read == over  # it stopped reading at the limit
        body = sent.json()
        assert body["error"] == "payload_too_large"
        assert "PM_MAX_BODY_BYTES" in body["detail"]
    put = _chunked(client, "/users/u1/prompt", headers=admin(), chunks=1000, method="PUT")
    assert (put.status, put.chunks_read) == (413, over)


def test_streamed_import_is_held_to_its_own_limit(
    redis_server: RedisServer, store_redis: Redis
) -> None:
    settings = make_settings(redis_server, max_import_bytes=4 * LIMIT)
    with TestClient(create_app(settings)) as client:
        seed_set(client.app.state.store, model="m-a", users=["u1"])  # type: ignore[attr-defined]
        sent = _chunked(client, "/models/m-a/import", headers=admin(), chunks=1000)
    assert sent.status == 413, sent.body
    assert sent.chunks_read == 4 * LIMIT // len(CHUNK) + 1
    assert "PM_MAX_IMPORT_BYTES" in sent.json()["detail"]


def test_bodies_within_the_limit_and_public_routes_pass(client: TestClient) -> None:
    # A body under the limit reaches the route, which answers as before.
    sent = _chunked(client, "/prompts/batch", headers=reader(), chunks=2)
    assert sent.status == 422 and sent.chunks_read == 2
    # No route, or a method the route does not take: not a token question.
    assert _chunked(client, "/nowhere", headers={}, chunks=10).status == 404
    assert _chunked(client, "/healthz", headers={}, chunks=10).status == 405
