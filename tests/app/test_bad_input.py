"""Bad input gets a 4xx whose JSON says what to fix, and changes nothing stored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from redis import Redis
from redis.cluster import RedisCluster

from app.main import create_app
from app.store import USER_ID_PATTERN, Store
from tests.app.sets import model_set
from tests.conftest import RedisServer, admin, make_settings, reader, seed_set

USERS = ["u1", "u2"]


def _snapshot(redis: Redis | RedisCluster) -> dict[bytes, object]:
    out: dict[bytes, object] = {}
    for key in redis.scan_iter(count=1000):
        kind = redis.type(key)
        out[key] = redis.dump(key) if kind != b"hash" else redis.hgetall(key)
    return out


@pytest.fixture
def unchanged(client: TestClient, store: Store) -> Iterator[None]:
    seed_set(store, model="m-a", users=USERS)
    seed_set(store, model="m-b", users=USERS)
    before = _snapshot(store.redis)
    yield
    assert _snapshot(store.redis) == before


def _bad(response: object, status: int | tuple[int, ...], word: str) -> None:
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, response.text  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert word.lower() in body["detail"].lower(), body


VALID_MIGRATION: dict[str, object] = {
    "sources": [{"model": "m-a"}],
    "target": "m-b",
    "dataset": "synthetic-tiny",
}


@pytest.mark.usefixtures("unchanged")
class TestRefusedAndNothingChanges:
    def test_unknown_model(self, client: TestClient) -> None:
        _bad(client.get("/users/u1/prompt?model=nope", headers=reader()), 404, "register")
        body = VALID_MIGRATION | {"target": "nope"}
        _bad(client.post("/migrations", json=body, headers=admin()), 404, "unknown model")
        _bad(client.post("/models", json={"name": "nope"}, headers=admin()), 404, "unknown")
        activate = client.post("/models/nope/activate", json={"version": "1"}, headers=admin())
        _bad(activate, 404, "register")

    def test_unknown_user_and_job(self, client: TestClient) -> None:
        _bad(client.get("/users/ghost/prompt", headers=reader()), 404, "no prompt")
        _bad(client.get("/migrations/nojob", headers=reader()), 404, "unknown job")
        _bad(client.post("/migrations/nojob/cancel", headers=admin()), 404, "unknown job")

    def test_unknown_version(self, client: TestClient) -> None:
        activate = client.post("/models/m-a/activate", json={"version": "99"}, headers=admin())
        _bad(activate, 404, "version")

    def test_malformed_json(self, client: TestClient) -> None:
        headers = admin() | {"Content-Type": "application/json"}
        _bad(client.post("/migrations", content=b"{not json", headers=headers), 422, "fix")
        put = client.put("/users/u1/prompt", content=b"[1,", headers=headers)
        _bad(put, 422, "values")

    def test_wrong_shape_dtype_nan_inf(self, client: TestClient) -> None:
        put = lambda body, **kw: client.put("/users/u1/prompt", headers=admin(), **kw)  # noqa: E731
        _bad(put(None, json={"values": [[1.0] * 7]}), 422, "shape")
        _bad(put(None, json={"values": [[1.0] * 8, [1.0] * 8]}), 422, "shape")
        nan = b'{"values": [[NaN, 1, 1, 1, 1, 1, 1, Infinity]]}'
        jsonct = {"Content-Type": "application/json"}
        nan_put = client.put("/users/u1/prompt", content=nan, headers=admin() | jsonct)
        _bad(nan_put, 422, "nan")
        raw = np.full(8, np.inf, dtype="<f4").tobytes()
        octet = {"Content-Type": "application/octet-stream"}
        response = client.put("/users/u1/prompt", content=raw, headers=admin() | octet)
        _bad(response, 422, "nan or inf")
        odd = client.put("/users/u1/prompt", content=b"abc", headers=admin() | octet)
        _bad(odd, 422, "multiple")
        dtype = client.put(
            "/users/u1/prompt", content=raw, headers=admin() | octet | {"X-Prompt-Dtype": "int8"}
        )
        _bad(dtype, 422, "x-prompt-dtype")

    def test_oversized_body(self, client: TestClient) -> None:
        big = b"\0" * (65 * 1024)
        headers = admin() | {"Content-Type": "application/octet-stream"}
        _bad(client.put("/users/u1/prompt", content=big, headers=headers), 413, "limit")

    def test_bad_user_ids(self, client: TestClient) -> None:
        for user in ("bad%20id", "x" * 129, "semi;colon", "%7Bhash%7D"):
            _bad(client.get(f"/users/{user}/prompt", headers=reader()), 422, "user_id")
        batch = client.post("/prompts/batch", json={"user_ids": ["ok", "b d"]}, headers=reader())
        _bad(batch, 422, "invalid user ids")

    def test_budget_outside_population(self, client: TestClient) -> None:
        body = VALID_MIGRATION | {"selection": {"strategy": "puma", "budget": 3}}
        _bad(client.post("/migrations", json=body, headers=admin()), 422, "budget")
        body = VALID_MIGRATION | {"selection": {"strategy": "random"}}
        _bad(client.post("/migrations", json=body, headers=admin()), 422, "budget")

    def test_input_rank_beyond_the_source_set(self, client: TestClient) -> None:
        for rank in (2, 9):  # the set holds 2 prompt vectors of 8 features
            body = VALID_MIGRATION | {
                "selection": {"strategy": "all"},
                "adapter": {"input_rank": rank},
            }
            _bad(client.post("/migrations", json=body, headers=admin()), 422, "input_rank")
        body = VALID_MIGRATION | {"adapter": {"input_rank": 0}}
        _bad(client.post("/migrations", json=body, headers=admin()), 422, "input_rank")

    def test_same_source_and_target(self, client: TestClient) -> None:
        body = VALID_MIGRATION | {"target": "m-a"}
        _bad(client.post("/migrations", json=body, headers=admin()), 422, "same model")

    def test_unknown_dataset_and_missing_path(self, client: TestClient) -> None:
        body = VALID_MIGRATION | {"dataset": "nope"}
        _bad(client.post("/migrations", json=body, headers=admin()), 404, "POST /datasets")
        missing = {"name": "mine", "path": "/does/not/exist.jsonl"}
        _bad(client.post("/datasets", json=missing, headers=admin()), 422, "no file")

    def test_bad_selection_and_unknown_fields(self, client: TestClient) -> None:
        body = VALID_MIGRATION | {"selection": {"strategy": "magic"}}
        _bad(client.post("/migrations", json=body, headers=admin()), 422, "selection")
        body = VALID_MIGRATION | {"colour": "red"}
        _bad(client.post("/migrations", json=body, headers=admin()), 422, "colour")
        body = VALID_MIGRATION | {"adapter": {"distill_weight": 1.5}}
        _bad(client.post("/migrations", json=body, headers=admin()), 422, "distill_weight")

    def test_instant_migration_takes_no_training_options(self, client: TestClient) -> None:
        body = VALID_MIGRATION | {"method": "instant", "adapter": {"epochs": 2}}
        _bad(client.post("/migrations", json=body, headers=admin()), 422, "drop them")
        body = VALID_MIGRATION | {"method": "retrain"}
        _bad(client.post("/migrations", json=body, headers=admin()), 422, "method")


def test_large_but_finite_values_are_accepted(client: TestClient, store: Store) -> None:
    seed_set(store, model="m-a", users=USERS)
    ok = client.put("/users/u1/prompt", json={"values": [[1e6] * 8]}, headers=admin())
    assert ok.status_code == 200


def test_register_dataset(client: TestClient, tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"user_id": "u1", "item_text": "x", "label": 4, "timestamp": 1}\n')
    response = client.post("/datasets", json={"name": "mine", "path": str(path)}, headers=admin())
    assert response.status_code == 201
    names = [d["name"] for d in client.get("/datasets", headers=reader()).json()]
    assert {"movielens-100k", "movielens-1m", "mine"} <= set(names)


def _setfile_bytes(header: object, data: bytes = b"") -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def _prompts_entry(**fields: object) -> dict[str, object]:
    return {"dtype": "F32", "shape": [1, 1, 48], "data_offsets": [0, 192]} | fields


ROW = b"\0" * 192  # one [1, 1, 48] F32 prompt
OVER_64_BITS = [2**62, 2**62, 48]
MALFORMED_HEADERS: dict[str, tuple[bytes, str]] = {
    "entry not an object": (_setfile_bytes({"prompts": 5}, ROW), "not an object"),
    "shape not a list": (_setfile_bytes({"prompts": _prompts_entry(shape="abc")}, ROW), "shape"),
    "shape missing": (_setfile_bytes({"prompts": _prompts_entry(shape=None)}, ROW), "shape"),
    "shape over 64 bits": (
        _setfile_bytes({"prompts": _prompts_entry(shape=OVER_64_BITS, data_offsets=[0, 0])}),
        "more than",
    ),
    "dimension over 64 bits": (
        _setfile_bytes({"prompts": _prompts_entry(shape=[2**64, 1, 48])}, ROW),
        "integers from 0",
    ),
    "negative dimension": (_setfile_bytes({"prompts": _prompts_entry(shape=[-1, 1, 48])}), "shape"),
    "boolean dimension": (
        _setfile_bytes({"prompts": _prompts_entry(shape=[True, 1, 48])}),
        "shape",
    ),
    "offsets not numbers": (
        _setfile_bytes({"prompts": _prompts_entry(data_offsets=["a", "b"])}, ROW),
        "data_offsets",
    ),
    "one offset": (_setfile_bytes({"prompts": _prompts_entry(data_offsets=[192])}, ROW), "offsets"),
    "dtype not a string": (
        _setfile_bytes({"prompts": _prompts_entry(dtype=["F32"])}, ROW),
        "dtype",
    ),
    "metadata not an object": (
        _setfile_bytes({"__metadata__": [1], "prompts": _prompts_entry()}, ROW),
        "__metadata__",
    ),
    "nested too deep": (_setfile_bytes(b"[" * 50_000 + b"]" * 50_000), "not JSON"),
    "present of two dimensions": (
        _setfile_bytes(
            {
                "prompts": _prompts_entry(),
                "present": {"dtype": "U8", "shape": [1, 1], "data_offsets": [192, 193]},
            },
            ROW + b"\1",
        ),
        "1 dimension",
    ),
    "bundle not JSON": (
        _setfile_bytes(
            {
                "__metadata__": {
                    "format": "prompt-migration/prompt-set",
                    "space": "model_input",
                    "bundle": "{not json",
                },
                "prompts": _prompts_entry(),
            },
            ROW,
        ),
        "bundle is not JSON",
    ),
    "bundle of the wrong shape": (
        _setfile_bytes(
            {
                "__metadata__": {
                    "format": "prompt-migration/prompt-set",
                    "task": "rating",
                    "space": "raw_embedding_table",
                    "bundle": '{"checkpoint": 5}',
                },
                "prompts": _prompts_entry(),
            },
            ROW,
        ),
        "malformed",
    ),
}


@pytest.mark.parametrize("case", MALFORMED_HEADERS, ids=list(MALFORMED_HEADERS))
def test_malformed_import_headers_get_422(
    client: TestClient, store: Store, store_redis: Redis, case: str
) -> None:
    model_set(store, users=USERS)
    before = _snapshot(store.redis)
    body, phrase = MALFORMED_HEADERS[case]
    response = client.post("/models/tiny-gemma/import", content=body, headers=admin())
    _bad(response, 422, phrase)
    assert _snapshot(store.redis) == before


def test_malformed_put_bodies_get_422(client: TestClient, store: Store) -> None:
    seed_set(store, model="m-a", users=USERS)
    before = _snapshot(store.redis)
    jsonct = admin() | {"Content-Type": "application/json"}
    cases = {
        "ragged rows": json.dumps({"values": [[1.0] * 8, [1.0] * 7]}).encode(),
        "nested too deep": b'{"values": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
        "values not a list": b'{"values": {"a": 1}}',
        "number over 64 bits": b'{"values": [[' + b"9" * 400 + b", 1, 1, 1, 1, 1, 1, 1]]}",
    }
    for name, body in cases.items():
        response = client.put("/users/u1/prompt", content=body, headers=jsonct)
        assert response.status_code != 500, name
        _bad(response, 422, "values")
    assert _snapshot(store.redis) == before


def test_batch_counts_users_before_it_checks_any_id(client: TestClient) -> None:
    """Over the limit, a batch is refused on its count: no id of it is checked."""
    too_many = {"user_ids": ["not an id"] * 1001}
    _bad(client.post("/prompts/batch", json=too_many, headers=reader()), 422, "send at most 1000")
    one_bad = {"user_ids": ["ok", "not an id"]}
    _bad(client.post("/prompts/batch", json=one_bad, headers=reader()), 422, "invalid user ids")
    schema = client.get("/openapi.json").json()["components"]["schemas"]["BatchRequest"]
    assert schema["properties"]["user_ids"]["items"]["pattern"] == USER_ID_PATTERN


def test_batch_replies_are_bounded_in_bytes(redis_server: RedisServer, store_redis: Redis) -> None:
    settings = make_settings(redis_server, max_batch_reply_bytes=1024)
    with TestClient(create_app(settings)) as client:
        store: Store = client.app.state.store  # type: ignore[attr-defined]
        seed_set(store, model="m-a", users=["u1", "u2", "u3", "u4"], shape=(1, 64))
        post = lambda users, fmt: client.post(  # noqa: E731
            f"/prompts/batch?format={fmt}", json={"user_ids": users}, headers=reader()
        )
        assert post(["u1", "u2"], "json").status_code == 200
        _bad(post(["u1", "u2", "u3", "u4"], "json"), 422, "send at most 2 users")
        assert post(["u1", "u2", "u3"], "safetensors").status_code == 200
        _bad(post(["u1", "u2", "u3", "u4"], "safetensors"), 422, "PM_MAX_BATCH_REPLY_BYTES")
