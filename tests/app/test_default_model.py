"""Which model readers who omit ``?model=`` get: it changes only by an explicit act (promoting a
migration onto the serving model, or an activation that says ``default``), never as a side effect
of activating, importing or training another model's set. And promotion never rolls back."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prompt_migration_client.operator import OperatorClient

from app.errors import ConflictError
from app.store import Store
from tests.app.sets import model_set
from tests.conftest import ADMIN, admin, reader, seed_set

OLD, NEW = "tiny-llama", "tiny-gemma"  # the serving model's upgrade: old -> new


def served_model(client: TestClient) -> str:
    response = client.get("/users/u1/prompt", headers=reader())
    assert response.status_code == 200, response.text
    return response.headers["X-Prompt-Model"]


def defaults(client: TestClient) -> list[str]:
    return [m["name"] for m in client.get("/models", headers=reader()).json() if m["default"]]


def upgraded(store: Store) -> tuple[str, str]:
    """OLD served by default, then a migration OLD -> NEW promoted: readers moved to NEW."""
    old, _ = model_set(store, model=OLD, users=["u1"])
    new, _ = model_set(store, model=NEW, users=["u1"], activate=False)
    store.promote(NEW, new, sources=[OLD])
    return old, new


def test_promoting_a_migration_of_the_serving_model_moves_its_readers(
    client: TestClient, store: Store
) -> None:
    upgraded(store)
    assert served_model(client) == NEW and defaults(client) == [NEW]


def test_rolling_back_the_old_model_does_not_switch_readers(
    client: TestClient, store: Store
) -> None:
    old, _ = upgraded(store)
    response = client.post(f"/models/{OLD}/activate", json={"version": old}, headers=admin())
    assert response.status_code == 200, response.text
    assert response.json()["default_model"] == NEW
    assert served_model(client) == NEW and defaults(client) == [NEW]
    # Moving them back is a call that says so, and GET /models shows it.
    body = {"version": old, "default": True}
    response = client.post(f"/models/{OLD}/activate", json=body, headers=admin())
    assert response.json()["default_model"] == OLD
    assert served_model(client) == OLD and defaults(client) == [OLD]


def test_importing_or_training_another_model_does_not_switch_readers(
    client: TestClient, store: Store, tmp_path: Path
) -> None:
    upgraded(store)
    seed_set(store, model="other", users=["u1"])  # a training job activates its set like this
    api = OperatorClient(token=ADMIN, http=client)
    path = api.export(OLD, "1", tmp_path / "old.safetensors")
    assert api.import_file(OLD, path, activate=True)["active"]
    assert served_model(client) == NEW and defaults(client) == [NEW]


def test_promoting_onto_another_model_leaves_the_default(client: TestClient, store: Store) -> None:
    upgraded(store)
    side, _ = seed_set(store, model="side", users=["u1"], activate=False)
    store.promote("side", side, sources=["unrelated"])
    assert served_model(client) == NEW


def test_a_late_promotion_cannot_roll_back_a_newer_one(store: Store) -> None:
    seed_set(store, model=OLD, users=["u1"])
    older, _ = seed_set(store, model=NEW, users=["u1"], activate=False)
    newer, _ = seed_set(store, model=NEW, users=["u1"], activate=False)
    store.promote(NEW, newer, sources=[OLD])
    with pytest.raises(ConflictError, match="newer"):
        store.promote(NEW, older, sources=[OLD])
    assert store.resolve(NEW) == (NEW, newer)
    store.activate(NEW, older)  # an explicit rollback still may
    assert store.resolve(NEW) == (NEW, older)
