"""Request fields that size a job's work have upper bounds: past them, a 422 that names the
field, and no job."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.store import Store
from tests.conftest import admin, seed_set

MIGRATION: dict[str, Any] = {
    "sources": [{"model": "m-a"}],
    "target": "m-b",
    "dataset": "synthetic-tiny",
    "selection": {"strategy": "all"},
}
MIGRATION_OVERSIZED = [
    ("adapter.hidden", {"adapter": {"hidden": 4097}}),
    ("adapter.batch_size", {"adapter": {"batch_size": 10**9}}),
    ("adapter.input_rank", {"adapter": {"input_rank": 4097}}),
    ("max_users", {"max_users": 10**12}),
    ("selection.budget", {"selection": {"strategy": "all", "budget": 10**12}}),
    ("seed", {"seed": 2**64}),
    ("chunk_size", {"chunk_size": 10**6}),
]
TRAINING_OVERSIZED = [
    ("max_users", {"max_users": 10**12}),
    ("prompt_length", {"prompt_length": 65}),
    ("epochs", {"epochs": 10**6}),
    ("seed", {"seed": -1}),
]


def _refused(response: Any, field: str) -> None:
    assert response.status_code == 422, response.text
    body = response.json()
    assert field in body["detail"], body
    assert any(p["field"].endswith(field) for p in body["problems"]), body


@pytest.mark.parametrize(("field", "change"), MIGRATION_OVERSIZED)
def test_oversized_migration_fields_are_refused(
    client: TestClient, store: Store, field: str, change: dict[str, Any]
) -> None:
    seed_set(store, model="m-a", users=["u1", "u2"])
    seed_set(store, model="m-b", users=["u1", "u2"])
    response = client.post("/migrations", json=MIGRATION | change, headers=admin())
    _refused(response, field)
    assert "less than or equal" in response.json()["detail"]
    assert store.list_jobs(limit=10, offset=0) == []


@pytest.mark.parametrize(("field", "change"), TRAINING_OVERSIZED)
def test_oversized_training_fields_are_refused(
    client: TestClient, store: Store, field: str, change: dict[str, Any]
) -> None:
    seed_set(store, model="m-a", users=["u1", "u2"])
    body = {"dataset": "synthetic-tiny"} | change
    _refused(client.post("/models/m-a/train", json=body, headers=admin()), field)
    assert store.list_jobs(limit=10, offset=0) == []
