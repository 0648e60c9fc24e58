"""A migrated set follows its sources: writes at every stage of the job, and after it, end with
the stored adapter's mapping of each user's latest source prompt (a real worker, tiny models)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prompt_migration_client import codec
from redis import Redis

from app.config import Settings
from app.store import Store
from tests.conftest import Delays, RedisServer, admin, make_settings, reader, wait_for
from tests.workers.helpers import (
    SOURCE,
    TARGET,
    assert_exact_set,
    expected_prompts,
    job,
    migrate,
    service_with_source,
    wait_done,
)

CHAINED = "tiny-llama-b"


@pytest.fixture(scope="module")
def env(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    # Small chunks with a pause before each, and a pause in the loading stage: room to write
    # users in every window of the job.
    settings = make_settings(redis_server, chunk_size=4)
    Redis.from_url(settings.redis_url).flushdb()
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    slow = Delays(chunk=0.3, load=1.5)
    with service_with_source(settings, log, delays=slow) as service:
        yield {"client": service.client, "store": service.store, "settings": settings}


@pytest.fixture
def client(env: dict[str, Any]) -> TestClient:
    c: TestClient = env["client"]
    return c


@pytest.fixture
def store(env: dict[str, Any]) -> Store:
    s: Store = env["store"]
    return s


_rng = np.random.default_rng(7)


def put(client: TestClient, store: Store, user: str, *, model: str = SOURCE) -> bytes:
    """A new random prompt for ``user`` on ``model``'s active set; returns what it stored."""
    shape = store.get_meta(*store.resolve(model)).shape
    value = _rng.standard_normal(shape).astype("<f4").tobytes()
    response = client.put(
        f"/users/{user}/prompt", params={"model": model}, content=value, headers=admin()
    )
    assert response.status_code == 200, response.text
    return value


def erase(client: TestClient, user: str) -> None:
    assert client.delete(f"/users/{user}", headers=admin()).status_code == 200


def _matches(store: Store, model: str, version: str, expected: dict[str, bytes]) -> bool:
    if store.set_users(model, version) != sorted(expected):
        return False
    values = store.get_prompts(model, version, sorted(expected))
    return all(
        v is not None and _close(v, expected[u])
        for u, v in zip(sorted(expected), values, strict=True)
    )


def _close(got: bytes, want: bytes) -> bool:
    return bool(np.allclose(np.frombuffer(got, "<f4"), np.frombuffer(want, "<f4"), atol=1e-6))


def assert_follows(store: Store, job_id: str, *, timeout: float = 30) -> dict[str, bytes]:
    """Once the follow caught up: the target holds exactly the stored adapter's mapping of every
    user's latest source prompts, and its count and digest describe what it holds."""
    record = store.get_job(job_id)
    model, version = record["target"]["model"], record["target"]["version"]
    wait_for(
        lambda: _matches(store, model, version, expected_prompts(store, job_id)),
        timeout=timeout,
        what=f"{model} version {version} following its sources",
    )
    expected = expected_prompts(store, job_id)
    assert_exact_set(store, model, version, expected)
    users = sorted(expected)
    held = dict(zip(users, store.get_prompts(model, version, users), strict=True))
    meta = store.get_meta(model, version)
    assert meta.count == len(expected)
    assert meta.digest == codec.set_digest([(u, v) for u, v in held.items() if v is not None])
    return expected


def finish(client: TestClient, job_id: str) -> dict[str, Any]:
    """The job once done, promoted: the random prompts the tests write leave the sources worse
    than no personalisation, so the quality gate may fail (it is not what these tests check)."""
    done = wait_done(client, job_id)
    assert done["state"] in ("awaiting_promotion", "gate_failed"), done
    promoted = client.post(f"/migrations/{job_id}/promote?force=true", headers=admin())
    assert promoted.status_code == 200, promoted.text
    return dict(promoted.json())


def wait_stage(client: TestClient, job_id: str, *stages: str) -> None:
    wait_for(lambda: job(client, job_id)["stage"] in stages, timeout=120, what=str(stages))


def test_writes_in_every_window_of_a_job_are_followed(client: TestClient, store: Store) -> None:
    created = migrate(client, auto_promote=False)
    users = store.set_users(*store.resolve(SOURCE))
    # Before the plan (loading): an update, a new user, an erasure; the erasure must not fail it.
    wait_stage(client, created["id"], "loading")
    put(client, store, users[0])
    put(client, store, "new-loading")
    erase(client, users[1])
    # During mapping, with chunks written and chunks still to come.
    wait_for(
        lambda: store.chunks_done(created["id"]) or job(client, created["id"])["state"] == "failed",
        timeout=120,
        what="a first chunk",
    )
    assert job(client, created["id"])["state"] == "running", job(client, created["id"])
    for user in (users[2], users[-1]):  # most likely written already, and not yet
        put(client, store, user)
    put(client, store, "new-mapping")
    erase(client, users[3])
    erase(client, users[4])
    put(client, store, users[4])  # erased, then onboarded again
    # After the last chunk, before sealing (finalize evaluates first).
    wait_stage(client, created["id"], "evaluating", "sealing", "done")
    put(client, store, users[5])
    put(client, store, "new-finalize")
    done = wait_done(client, created["id"])
    assert done["state"] in ("awaiting_promotion", "gate_failed"), done
    expected = assert_follows(store, done["id"])
    assert {"new-loading", "new-mapping", "new-finalize", users[4]} <= set(expected)
    assert users[1] not in expected and users[3] not in expected
    # Sealed, not promoted yet: a user onboarded now gets a prompt on the new model too.
    put(client, store, "new-awaiting")
    put(client, store, users[6])
    erase(client, users[7])
    assert "new-awaiting" in assert_follows(store, done["id"])
    promoted = client.post(f"/migrations/{done['id']}/promote?force=true", headers=admin())
    assert promoted.status_code == 200, promoted.text
    # Promoted: writers still on the source model are carried over, within the follow's delay.
    put(client, store, "new-promoted")
    put(client, store, users[8])
    erase(client, users[9])
    assert_follows(store, done["id"], timeout=10)
    served = client.get("/users/new-promoted/prompt", params={"model": TARGET}, headers=reader())
    assert served.status_code == 200, served.text
    want = expected_prompts(store, done["id"])["new-promoted"]
    assert np.allclose(np.frombuffer(served.content, "<f4"), np.frombuffer(want, "<f4"), atol=1e-6)


def test_a_chained_migration_follows_its_parent(client: TestClient, store: Store) -> None:
    first = finish(client, migrate(client, auto_promote=False)["id"])
    response = client.post(
        "/models", json={"name": CHAINED, "checkpoint": "tiny-llama"}, headers=admin()
    )
    assert response.status_code in (200, 201)
    parent = [{"model": TARGET, "version": first["target"]["version"]}]
    second = migrate(client, sources=parent, target=CHAINED, auto_promote=False)
    wait_for(lambda: store.chunks_done(second["id"]), timeout=120, what="a first chunk")
    user = store.set_users(*store.resolve(SOURCE))[0]
    put(client, store, user)  # on the first job's source: its set, then the chained set follow
    put(client, store, "new-chained")
    done = finish(client, second["id"])
    assert_follows(store, first["id"])
    assert "new-chained" in assert_follows(store, done["id"])
    put(client, store, "new-after-both")  # both promoted: the chain follows within its delay
    assert_follows(store, first["id"], timeout=10)
    assert "new-after-both" in assert_follows(store, done["id"], timeout=10)


def test_a_write_to_the_target_during_the_job_is_not_lost(client: TestClient, store: Store) -> None:
    if TARGET not in store.active_pointers():
        finish(client, migrate(client, auto_promote=False)["id"])
    created = migrate(client, auto_promote=False)
    wait_for(lambda: store.chunks_done(created["id"]), timeout=120, what="a first chunk")
    users = store.set_users(*store.resolve(SOURCE))
    direct = put(client, store, users[0], model=TARGET)  # the latest write of users[0]
    put(client, store, "target-only", model=TARGET)
    put(client, store, users[1], model=TARGET)
    put(client, store, users[1])  # then its source prompt: the source's mapping wins
    done = finish(client, created["id"])
    model, version = done["target"]["model"], done["target"]["version"]
    mapped = expected_prompts(store, done["id"])
    wait_for(lambda: store.get_prompt(model, version, "target-only") is not None, timeout=10)
    assert store.get_prompt(model, version, users[0]) == direct
    assert store.get_prompt(model, version, "target-only") is not None
    assert np.allclose(
        np.frombuffer(store.get_prompt(model, version, users[1]) or b"", "<f4"),
        np.frombuffer(mapped[users[1]], "<f4"),
        rtol=1e-5,
        atol=1e-6,
    )
    # A source write after the direct one replaces it with the mapping of the new prompt.
    put(client, store, users[0])
    want = np.frombuffer(expected_prompts(store, done["id"])[users[0]], "<f4")
    wait_for(
        lambda: np.allclose(
            np.frombuffer(store.get_prompt(model, version, users[0]) or b"", "<f4"),
            want,
            rtol=1e-5,
            atol=1e-6,
        ),
        timeout=10,
        what="the source write after the direct one",
    )
    for user in ("target-only",):
        erase(client, user)


def _keys_of(store: Store, model: str, version: str) -> list[bytes]:
    return list(store.redis.scan_iter(match=f"pm:{{{model}:{version}}}:*", count=1000))


def test_a_cancelled_job_leaves_no_keys_even_after_a_late_chunk(
    client: TestClient, store: Store, env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers import context
    from workers.mapping import map_chunk

    created = migrate(client)
    wait_for(lambda: store.chunks_done(created["id"]), timeout=120, what="a first chunk")
    assert client.post(f"/migrations/{created['id']}/cancel", headers=admin()).status_code == 202
    done = wait_done(client, created["id"])
    assert done["state"] == "cancelled", done
    model, version = done["target"]["model"], done["target"]["version"]
    source = store.get_job(created["id"])["sources"][0]
    # A chunk task that passed its checks before the cancel writes after the set was dropped.
    monkeypatch.setattr(context, "_store", store)
    settings: Settings = env["settings"]
    chunks = store.plan_size(created["id"])
    late = next(i for i in range(chunks) if i not in store.chunks_done(created["id"]))
    map_chunk(context.JobRun(created["id"], settings=settings), late)
    assert _keys_of(store, model, version) == []
    followers = f"pm:{{{source['model']}:{source['version']}}}:followers"
    assert not store.redis.hexists(followers, f"{model}/{version}")
    pending = f"pm:{{{source['model']}:{source['version']}}}:pending:{model}/{version}"
    assert not store.redis.exists(pending)
