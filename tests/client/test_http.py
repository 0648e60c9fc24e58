"""The client's HTTP reads: version pinning, 304 reuse, batch reads, typed errors, asyncio."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prompt_migration_client import (
    AsyncPromptClient,
    BadRequest,
    NotFound,
    PromptClient,
    Unauthorized,
)

from app.config import Settings
from app.store import Store
from tests.app.sets import model_set
from tests.conftest import READER


def recording_client(client: TestClient, statuses: list[int]) -> PromptClient:
    client.event_hooks["response"] = [lambda response: statuses.append(response.status_code)]
    return PromptClient(token=READER, http=client)


def test_reads_pin_a_version_and_reuse_what_did_not_change(
    client: TestClient, store: Store
) -> None:
    old, old_prompts = model_set(store, seed=1)
    new, new_prompts = model_set(store, seed=2)
    statuses: list[int] = []
    api = recording_client(client, statuses)
    active = api.prompt("u1", model="tiny-gemma")
    assert active.version == new and np.array_equal(active.values, new_prompts["u1"])
    pinned = api.prompt("u1", model="tiny-gemma", version=old)
    assert np.array_equal(pinned.values, old_prompts["u1"])
    statuses.clear()
    assert api.prompt("u1", model="tiny-gemma", version=old) is pinned
    assert statuses == [304]
    batch = api.prompts(["u1", "u2", "ghost"], model="tiny-gemma", version=old)
    assert batch.version == old and batch.missing == ["ghost"]
    assert np.array_equal(batch.prompts["u2"], old_prompts["u2"])
    bundle = api.bundle("tiny-gemma", old)
    assert bundle.version == old and bundle.shape == (1, 48)
    assert api.bundle("tiny-gemma", old) is bundle  # a version's bundle never changes


def test_errors_are_typed_and_carry_the_service_message(client: TestClient, store: Store) -> None:
    version, _ = model_set(store)
    api = PromptClient(token=READER, http=client)
    with pytest.raises(NotFound, match="has no prompt") as missing:
        api.prompt("ghost", model="tiny-gemma")
    assert missing.value.status == 404
    with pytest.raises(NotFound, match="its versions"):
        api.bundle("tiny-gemma", "99")
    with pytest.raises(BadRequest, match="version"):
        api.json("POST", "/prompts/batch", json={"user_ids": ["u1"], "version": version})
    with pytest.raises(Unauthorized, match="Invalid bearer token"):
        PromptClient(token="wrong-token", http=client).prompt("u1")


def test_async_client_reads_the_same(settings: Settings, store_redis: object) -> None:
    from app.main import create_app

    app = create_app(settings)
    version, prompts = model_set(app.state.store, seed=3)

    async def read() -> None:
        transport = httpx.ASGITransport(app=app)
        http = httpx.AsyncClient(transport=transport, base_url="http://api")
        async with AsyncPromptClient(token=READER, http=http) as api:
            one = await api.prompt("u2", model="tiny-gemma", version=version)
            again = await api.prompt("u2", model="tiny-gemma", version=version)
            batch = await api.prompts(["u1", "u3"], model="tiny-gemma")
            bundle = await api.bundle("tiny-gemma", version)
            with pytest.raises(NotFound, match="has no prompt"):
                await api.prompt("ghost")
        assert again is one and np.array_equal(one.values, prompts["u2"])
        assert batch.version == version and sorted(batch.prompts) == ["u1", "u3"]
        assert bundle.doc["task"]["name"] == "rating"

    asyncio.run(read())
    app.state.store.redis.close()
