"""A job whose first task the broker does not take fails at once; a retry makes a new job."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from app.dev.local_redis import free_port
from app.main import create_app
from app.store import Store
from tests.conftest import RedisServer, admin, make_settings, reader, seed_set

MIGRATION: dict[str, Any] = {
    "sources": [{"model": "m-a"}],
    "target": "m-b",
    "dataset": "synthetic-tiny",
    "selection": {"strategy": "all"},
}


@pytest.fixture
def broker_down_client(redis_server: RedisServer) -> Iterator[TestClient]:
    """The API with its store up and its broker at a closed port."""
    settings = make_settings(redis_server, broker_url=f"redis://127.0.0.1:{free_port()}/1")
    Redis.from_url(settings.redis_url).flushdb()
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def _refused_by_the_broker(response: Any) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"] == "broker_unavailable", body
    assert "retry" in body["detail"] and "PM_BROKER_URL" in body["detail"], body


def test_a_migration_the_broker_refuses_fails_and_frees_its_key(
    broker_down_client: TestClient,
) -> None:
    client = broker_down_client
    store: Store = client.app.state.store  # type: ignore[attr-defined]
    seed_set(store, model="m-a", users=["u1", "u2"])
    seed_set(store, model="m-b", users=["u1", "u2"])
    headers = admin() | {"Idempotency-Key": "once-only"}
    for _ in range(2):  # the retry with the same key is a new job, not the dead one
        _refused_by_the_broker(client.post("/migrations", json=MIGRATION, headers=headers))
    jobs = client.get("/migrations", headers=reader()).json()["jobs"]
    assert len({j["id"] for j in jobs}) == 2, jobs
    for job in jobs:
        assert job["state"] == "failed", job
        assert "never started" in job["error"], job


def test_a_training_the_broker_refuses_fails(broker_down_client: TestClient) -> None:
    client = broker_down_client
    store: Store = client.app.state.store  # type: ignore[attr-defined]
    seed_set(store, model="m-a", users=["u1", "u2"])
    body = {"dataset": "synthetic-tiny", "epochs": 1}
    _refused_by_the_broker(client.post("/models/m-a/train", json=body, headers=admin()))
    (job,) = client.get("/migrations", headers=reader()).json()["jobs"]
    assert job["state"] == "failed" and job["kind"] == "train", job
