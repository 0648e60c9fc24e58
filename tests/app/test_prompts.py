"""Serving, onboarding, erasing and batch-reading user prompts."""

from __future__ import annotations

import base64

import numpy as np
from fastapi.testclient import TestClient
from prompt_migration_client import codec
from safetensors.numpy import load as load_safetensors

from app.store import Store
from tests.conftest import admin, reader, seed_set

USERS = ["u1", "u2", "user.3:x-y_z"]


def test_raw_prompt_with_headers_and_etag(client: TestClient, store: Store) -> None:
    version, values = seed_set(store, model="m-a", users=USERS)
    response = client.get("/users/u1/prompt", headers=reader())
    assert response.status_code == 200
    assert response.content == values["u1"]
    assert response.headers["X-Prompt-Model"] == "m-a"
    assert response.headers["X-Prompt-Version"] == version
    assert response.headers["X-Prompt-Shape"] == "1,8"
    assert response.headers["X-Prompt-Dtype"] == "float32"
    assert response.headers["X-Prompt-Digest"] == "sha256:" + codec.digest(values["u1"])
    etag = response.headers["ETag"]
    again = client.get("/users/u1/prompt", headers=reader() | {"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""


def test_json_and_safetensors_formats(client: TestClient, store: Store) -> None:
    _, values = seed_set(store, model="m-a", users=USERS)
    expected = np.frombuffer(values["u2"], "<f4").reshape(1, 8)
    body = client.get("/users/u2/prompt?format=json&model=m-a", headers=reader()).json()
    assert np.allclose(body["values"], expected) and body["shape"] == [1, 8]
    raw = client.get("/users/u2/prompt?format=safetensors", headers=reader()).content
    assert np.array_equal(load_safetensors(raw)["prompt"], expected)


def test_batch_returns_known_and_lists_missing(client: TestClient, store: Store) -> None:
    _, values = seed_set(store, model="m-a", users=USERS)
    response = client.post("/prompts/batch", json={"user_ids": ["u1", "nobody"]}, headers=reader())
    body = response.json()
    assert base64.b64decode(body["prompts"]["u1"]) == values["u1"]
    assert body["missing"] == ["nobody"]


def test_onboard_json_and_raw(client: TestClient, store: Store) -> None:
    version, _ = seed_set(store, model="m-a", users=USERS)
    values = np.arange(8, dtype=np.float32).reshape(1, 8)
    put = client.put("/users/new1/prompt", json={"values": values.tolist()}, headers=admin())
    assert put.status_code == 200 and put.json()["created"] is True
    assert client.get("/users/new1/prompt", headers=reader()).content == values.tobytes()
    raw = (values * 2).astype("<f2").tobytes()
    headers = admin() | {"Content-Type": "application/octet-stream", "X-Prompt-Dtype": "float16"}
    assert client.put("/users/new2/prompt", content=raw, headers=headers).status_code == 200
    served = client.get("/users/new2/prompt", headers=reader()).content
    assert np.array_equal(np.frombuffer(served, "<f4"), (values * 2).ravel())
    assert store.get_meta("m-a", version).count == len(USERS) + 2


def test_erase_user_everywhere(client: TestClient, store: Store) -> None:
    seed_set(store, model="m-a", users=USERS)
    seed_set(store, model="m-b", users=USERS)
    response = client.delete("/users/u1", headers=admin())
    assert response.json()["keys_removed"] == 2
    for model in ("m-a", "m-b"):
        answer = client.get(f"/users/u1/prompt?model={model}", headers=reader())
        assert answer.status_code == 404
    assert client.get("/users/u2/prompt", headers=reader()).status_code == 200
    assert client.delete("/users/u1", headers=admin()).status_code == 404
