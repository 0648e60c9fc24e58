"""The read hot path: no thread hops, one atomic Redis call, documented shapes, metrics, limits."""

from __future__ import annotations

import base64
import contextlib
import inspect
import json
import re
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from safetensors import safe_open

from app.http.schemas import BatchOut
from app.store import SetMeta, Store
from tests.conftest import admin, read_burst_errors, reader, seed_set

USERS = ["u1", "u2", "u3"]
HOT = {("GET", "/users/{user_id}/prompt"), ("POST", "/prompts/batch")}


@contextlib.contextmanager
def safe_open_bytes(data: bytes) -> Iterator[tuple[dict[str, np.ndarray], dict[str, str]]]:
    """The tensors and metadata of a safetensors file held in memory."""
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(data)
        f.flush()
        with safe_open(f.name, framework="np") as opened:
            yield {k: opened.get_tensor(k) for k in opened.keys()}, opened.metadata()  # noqa: SIM118


@pytest.fixture
def client(either_client: TestClient) -> TestClient:
    """Every test here runs on a single Redis and on a Redis Cluster."""
    return either_client


def _calls(dependant: Dependant) -> Iterator[Any]:
    for sub in dependant.dependencies:
        yield from _calls(sub)
        yield sub.call


def _hot_routes(client: TestClient) -> list[APIRoute]:
    routes = []
    stack: list[Any] = list(client.app.routes)  # type: ignore[attr-defined]
    while stack:
        route = stack.pop()
        if isinstance(route, APIRoute):
            if any((m, route.path) in HOT for m in route.methods or ()):
                routes.append(route)
        elif hasattr(route, "original_router"):
            stack += route.original_router.routes
    return routes


def test_hot_routes_never_hop_to_a_thread(client: TestClient) -> None:
    routes = _hot_routes(client)
    assert len(routes) == 2
    for route in routes:
        assert inspect.iscoroutinefunction(route.endpoint), route.path
        for call in _calls(route.dependant):
            target = call if inspect.isroutine(call) else type(call).__call__  # HTTPBearer()
            assert inspect.iscoroutinefunction(target), (route.path, call)


def test_no_http_middleware_wraps_requests(client: TestClient) -> None:
    from starlette.middleware.base import BaseHTTPMiddleware

    classes = [m.cls for m in client.app.user_middleware]  # type: ignore[attr-defined]
    assert classes and not any(
        isinstance(c, type) and issubclass(c, BaseHTTPMiddleware) for c in classes
    )


def test_batch_has_the_documented_shape(client: TestClient, store: Store) -> None:
    version, values = seed_set(store, model="m-a", users=USERS)
    ids = ["u2", "nobody", "u1"]
    response = client.post("/prompts/batch", json={"user_ids": ids}, headers=reader())
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert BatchOut.model_validate(body).model_dump() == body
    assert list(body) == list(BatchOut.model_fields)
    assert body["model"] == "m-a" and body["version"] == version
    assert body["shape"] == [1, 8] and body["dtype"] == "float32"
    assert body["encoding"] == "base64"
    assert {u: base64.b64decode(v) for u, v in body["prompts"].items()} == {
        "u1": values["u1"],
        "u2": values["u2"],
    }
    assert body["missing"] == ["nobody"]
    schema = client.get("/openapi.json").json()
    ok = schema["paths"]["/prompts/batch"]["post"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"]["$ref"].endswith("/BatchOut")


def test_batch_as_safetensors_is_one_tensor_in_request_order(
    client: TestClient, store: Store
) -> None:
    version, values = seed_set(store, model="m-a", users=USERS)
    ids = ["u3", "nobody", "u1", "u3"]
    url = "/prompts/batch?format=safetensors"
    response = client.post(url, json={"user_ids": ids}, headers=reader())
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    with safe_open_bytes(response.content) as (tensors, metadata):
        assert json.loads(metadata["users"]) == ["u3", "u1"]
        assert json.loads(metadata["missing"]) == ["nobody"]
        assert (metadata["model"], metadata["version"]) == ("m-a", version)
        prompts = tensors["prompts"]
    assert prompts.shape == (2, 1, 8) and prompts.dtype == np.float32
    assert [prompts[i].tobytes() for i in range(2)] == [values["u3"], values["u1"]]
    none = client.post(url, json={"user_ids": ["nobody"]}, headers=reader())
    with safe_open_bytes(none.content) as (tensors, metadata):
        assert tensors["prompts"].shape == (0, 1, 8)
        assert json.loads(metadata["missing"]) == ["nobody"]
    bad = client.post("/prompts/batch?format=csv", json={"user_ids": ids}, headers=reader())
    assert bad.status_code == 422 and "format" in bad.json()["detail"]


def test_batch_reads_one_version_and_follows_promotion(client: TestClient, store: Store) -> None:
    old, old_values = seed_set(store, model="m-a", users=USERS, seed=1)
    new, new_values = seed_set(store, model="m-a", users=USERS, seed=2)
    body = client.post("/prompts/batch", json={"user_ids": USERS}, headers=reader()).json()
    assert body["version"] == new
    assert all(base64.b64decode(body["prompts"][u]) == new_values[u] for u in USERS)
    store.activate("m-a", old)
    body = client.post("/prompts/batch", json={"user_ids": USERS}, headers=reader()).json()
    assert body["version"] == old
    assert all(base64.b64decode(body["prompts"][u]) == old_values[u] for u in USERS)
    single = client.get("/users/u1/prompt", headers=reader())
    assert single.content == old_values["u1"] and single.headers["X-Prompt-Version"] == old


def test_explicit_version_and_unsealed_sets(client: TestClient, store: Store) -> None:
    old, old_values = seed_set(store, model="m-a", users=USERS, seed=1)
    seed_set(store, model="m-a", users=USERS, seed=2)
    pinned = client.get(f"/users/u1/prompt?model=m-a&version={old}", headers=reader())
    assert pinned.status_code == 200 and pinned.content == old_values["u1"]
    writing = store.allocate_version("m-a")
    store.begin_set(SetMeta(model="m-a", version=writing, task="rating", shape=[1, 8]))
    store.write_prompts("m-a", writing, [("u1", b"\0" * 32)])
    half = client.get(f"/users/u1/prompt?model=m-a&version={writing}", headers=reader())
    assert half.status_code == 404 and "not sealed" in half.json()["detail"]
    store.redis.hset("pm:{registry}:active", "m-a", writing)  # a pointer to a half-written set
    for response in (
        client.get("/users/u1/prompt", headers=reader()),
        client.post("/prompts/batch", json={"user_ids": ["u1"]}, headers=reader()),
    ):
        assert response.status_code == 404 and "not sealed" in response.json()["detail"]
    missing = client.get("/users/u1/prompt?model=m-a&version=999", headers=reader())
    assert missing.status_code == 404 and "no prompt set version" in missing.json()["detail"]


def test_not_found_messages_say_what_to_do(client: TestClient, store: Store) -> None:
    none = client.get("/users/u1/prompt", headers=reader())
    assert none.status_code == 404 and "No model is active" in none.json()["detail"]
    seed_set(store, model="m-a", users=USERS)
    unknown = client.get("/users/u1/prompt?model=nope", headers=reader())
    assert unknown.status_code == 404 and "POST /models" in unknown.json()["detail"]
    store.put_model("m-b", {"name": "m-b", "checkpoint": "m-b", "registered_at": 0})
    inactive = client.post(
        "/prompts/batch", json={"user_ids": ["u1"], "model": "m-b"}, headers=reader()
    )
    assert inactive.status_code == 404 and "no active prompt set" in inactive.json()["detail"]
    nobody = client.get("/users/nobody/prompt", headers=reader())
    assert nobody.status_code == 404 and "nobody" in nobody.json()["detail"]


def test_etag_list_and_formats_share_one_etag(client: TestClient, store: Store) -> None:
    seed_set(store, model="m-a", users=USERS)
    etag = client.get("/users/u1/prompt", headers=reader()).headers["ETag"]
    again = client.get(
        "/users/u1/prompt?format=json", headers=reader() | {"If-None-Match": f'"x", {etag}'}
    )
    assert again.status_code == 304 and again.headers["ETag"] == etag
    other = client.get("/users/u2/prompt", headers=reader() | {"If-None-Match": etag})
    assert other.status_code == 200


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    return 0.0


def test_metrics_count_routes_statuses_and_413(client: TestClient, store: Store) -> None:
    seed_set(store, model="m-a", users=USERS)
    route = "/users/{user_id}/prompt"
    before = client.get("/metrics").text
    assert client.get("/users/u1/prompt", headers=reader()).status_code == 200
    assert client.get("/users/u1/prompt").status_code == 401
    big = client.post(
        "/prompts/batch", content=b"x" * (65 * 1024), headers=admin() | {"Content-Type": "a/b"}
    )
    assert big.status_code == 413 and big.json()["error"] == "payload_too_large"
    after = client.get("/metrics").text
    name = "pm_http_requests_total"
    for labels, delta in (
        ({"method": "GET", "route": route, "status": "200"}, 1),
        ({"method": "GET", "route": route, "status": "401"}, 1),
        ({"method": "POST", "route": "/prompts/batch", "status": "413"}, 1),
    ):
        assert _sample(after, name, **labels) - _sample(before, name, **labels) == delta, labels
    count = "pm_http_request_seconds_count"
    labels = {"method": "GET", "route": route}
    assert _sample(after, count, **labels) - _sample(before, count, **labels) == 2


def test_batch_all_missing_and_repeated_ids(client: TestClient, store: Store) -> None:
    _, values = seed_set(store, model="m-a", users=USERS)
    none = client.post("/prompts/batch", json={"user_ids": ["x", "y"]}, headers=reader()).json()
    assert none["prompts"] == {} and none["missing"] == ["x", "y"]
    ids = ["u3", "x", "u3", "u1"]
    body = client.post("/prompts/batch", json={"user_ids": ids}, headers=reader()).json()
    assert {u: base64.b64decode(v) for u, v in body["prompts"].items()} == {
        "u3": values["u3"],
        "u1": values["u1"],
    }
    assert body["missing"] == ["x"]


def test_concurrent_reads_right_after_start_all_succeed(client: TestClient, store: Store) -> None:
    """A burst of concurrent reads on a fresh API: on a Redis Cluster this is where a client
    that discovers the nodes lazily races with itself and drops connections in use."""
    _, values = seed_set(store, model="m-a", users=USERS)
    assert read_burst_errors(client, store, values) == []


def test_reads_survive_a_redis_that_lost_its_functions(client: TestClient, store: Store) -> None:
    _, values = seed_set(store, model="m-a", users=USERS)
    assert client.get("/users/u1/prompt", headers=reader()).content == values["u1"]
    store.redis.function_flush()  # a fresh node, or an operator's FUNCTION FLUSH
    assert client.get("/users/u2/prompt", headers=reader()).content == values["u2"]
    batch = client.post("/prompts/batch", json={"user_ids": USERS}, headers=reader()).json()
    assert sorted(batch["prompts"]) == USERS
