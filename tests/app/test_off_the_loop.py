"""Routes that wait on the store's synchronous client, or on the disk, never hold up the event loop
that serves reads: while Redis holds their call (``CLIENT PAUSE``), the loop still runs."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient
from redis import Redis

from app.main import create_app
from tests.conftest import RedisServer, admin, make_settings, seed_set

HANG_S = 10.0  # far beyond any loop turn; only a loop held by the paused call waits this long


@pytest.fixture
def patient_client(redis_server: RedisServer, store_redis: Redis) -> Iterator[TestClient]:
    """The API with a Redis timeout longer than the pause, so its calls wait instead of failing."""
    settings = make_settings(redis_server, redis_timeout_s=60.0)
    with TestClient(create_app(settings)) as client:
        yield client


def _wait_for_paused_call(redis: Redis) -> None:
    """Until a client's command is held by the pause (or a hang-detecting timeout passes)."""
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        if int(redis.info("clients")["blocked_clients"]) > 0:
            return
        time.sleep(0.02)
    raise AssertionError("no call reached the paused Redis")


def _loop_turns_while_paused(
    client: TestClient, redis: Redis, *, pause: str, request: Callable[[], Any]
) -> Future[Any]:
    """Sends ``request`` while Redis pauses ``pause`` commands; asserts the event loop still
    runs while the request's Redis call waits, then lifts the pause. The request's future."""
    assert client.portal is not None
    redis.execute_command("CLIENT", "PAUSE", int(HANG_S * 3000), pause)
    pool = ThreadPoolExecutor(2)
    try:
        sent = pool.submit(request)
        _wait_for_paused_call(redis)
        turned = pool.submit(client.portal.call, anyio.sleep, 0)
        try:
            turned.result(timeout=HANG_S)
        except TimeoutError:
            pytest.fail("the event loop was held by a route waiting on Redis")
        assert not sent.done(), "the request's Redis call should still be paused"
    finally:
        redis.execute_command("CLIENT", "UNPAUSE")
        pool.shutdown(wait=True)
    return sent


def test_put_waiting_on_a_write_leaves_the_loop_free(
    patient_client: TestClient, store_redis: Redis
) -> None:
    store: Any = patient_client.app.state.store  # type: ignore[attr-defined]
    seed_set(store, model="m-a", users=["u1"])
    sent = _loop_turns_while_paused(
        patient_client,
        store_redis,
        pause="WRITE",
        request=lambda: patient_client.put(
            "/users/u2/prompt", json={"values": [[1.0] * 8]}, headers=admin()
        ),
    )
    assert sent.result(timeout=HANG_S).status_code == 200
