"""Registering models, listing them, and activating versions (rollback)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.store import Store
from tests.conftest import admin, reader, seed_set


def test_register_tiny_model_is_idempotent(client: TestClient) -> None:
    first = client.post("/models", json={"name": "tiny-llama"}, headers=admin())
    assert first.status_code == 201, first.text
    assert first.json()["hidden_size"] > 0
    again = client.post("/models", json={"name": "tiny-llama"}, headers=admin())
    assert again.status_code == 200
    clash = {"name": "tiny-llama", "checkpoint": "tiny-gemma"}
    assert client.post("/models", json=clash, headers=admin()).status_code == 409
    names = [m["name"] for m in client.get("/models", headers=reader()).json()]
    assert names == ["tiny-llama"]


def test_activate_rolls_back_in_one_step(client: TestClient, store: Store) -> None:
    old, old_values = seed_set(store, model="m-a", users=["u1"], seed=1)
    new, new_values = seed_set(store, model="m-a", users=["u1"], seed=2)
    assert client.get("/users/u1/prompt", headers=reader()).content == new_values["u1"]
    response = client.post("/models/m-a/activate", json={"version": old}, headers=admin())
    assert response.json() == {
        "model": "m-a",
        "version": old,
        "previous_version": new,
        "default_model": "m-a",
    }
    assert client.get("/users/u1/prompt", headers=reader()).content == old_values["u1"]
    listed = client.get("/models", headers=reader()).json()[0]
    assert listed["active_version"] == old and len(listed["versions"]) == 2


def test_unsealed_version_cannot_be_activated_or_read(client: TestClient, store: Store) -> None:
    from app.store import SetMeta

    seed_set(store, model="m-a", users=["u1"])
    version = store.allocate_version("m-a")
    store.begin_set(SetMeta(model="m-a", version=version, task="rating", shape=[1, 8]))
    store.write_prompts("m-a", version, [("u1", b"\0" * 32)])
    activate = client.post("/models/m-a/activate", json={"version": version}, headers=admin())
    assert activate.status_code == 409 and "sealed" in activate.json()["detail"]
    read = client.get(f"/users/u1/prompt?model=m-a&version={version}", headers=reader())
    assert read.status_code == 404
