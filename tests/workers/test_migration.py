"""Full jobs over HTTP with a real Celery worker on tiny models."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from prompt_migration_client import codec
from redis import Redis

from app.store import Store
from models import recipe
from models.adapter.model import adapter_from_bytes
from models.foundation import FoundationModel
from models.instant import fit_vocab_map
from tests.conftest import (
    Delays,
    RedisServer,
    admin,
    make_settings,
    reader,
    wait_for,
)
from tests.workers.helpers import (
    DATASET,
    FAST_ADAPTER,
    SOURCE,
    TARGET,
    assert_exact_set,
    expected_prompts,
    job,
    migrate,
    service_with_source,
    wait_done,
)
from workers.population import sample
from workers.stage_io import load_set

# A finished migration that was not promoted: a one-epoch adapter on two interactions per user
# may not beat the quality gate's no-personalisation floor, and the tests that train one check
# its cost, not its quality.
FINISHED = ("awaiting_promotion", "gate_failed")


@pytest.fixture(scope="module")
def env(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    settings = make_settings(redis_server, chunk_size=5)
    Redis.from_url(settings.redis_url).flushdb()
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with service_with_source(settings, log, delays=Delays(chunk=0.3)) as service:
        yield {
            "client": service.client,
            "store": service.store,
            "settings": settings,
            "source": service.source,
        }


@pytest.fixture
def client(env: dict[str, Any]) -> TestClient:
    c: TestClient = env["client"]
    return c


@pytest.fixture
def store(env: dict[str, Any]) -> Store:
    s: Store = env["store"]
    return s


def _activate(client: TestClient, model: str, version: str, *, default: bool = False) -> None:
    body = {"version": version, "default": default}
    response = client.post(f"/models/{model}/activate", json=body, headers=admin())
    assert response.status_code == 200, response.text


def test_prompt_training_made_the_first_set(client: TestClient, env: dict[str, Any]) -> None:
    source = env["source"]
    assert source["metrics"]["test"]["rmse"] > 0
    assert source["cost"]["example_passes"] > 0
    response = client.get("/users/u0/prompt", headers=reader())
    assert response.status_code == 200
    assert response.headers["X-Prompt-Model"] == SOURCE


def test_full_migration_serves_the_adapter_output(client: TestClient, store: Store) -> None:
    created = migrate(client)
    done = wait_done(client, created["id"])
    assert done["state"] == "promoted", done
    model, version = done["target"]["model"], done["target"]["version"]
    expected = expected_prompts(store, done["id"])
    assert_exact_set(store, model, version, expected)
    for user, value in list(expected.items())[:5]:
        served = client.get(f"/users/{user}/prompt", headers=reader())
        assert served.headers["X-Prompt-Model"] == TARGET
        assert np.allclose(np.frombuffer(served.content, "<f4"), np.frombuffer(value, "<f4"))
    assert set(done["metrics"]["migrated"]) >= {"rmse", "mae"}
    assert done["metrics"]["sources"]
    assert done["gate"]["passed"] is True
    assert done["cost"]["users_trained"] == 8
    assert done["cost"]["users_mapped"] == len(expected)
    assert done["progress"]["users_mapped"] == len(expected)
    assert done["progress"]["fraction"] == 1.0
    # Where the job's time went, by step, from the job's own timers.
    steps = done["cost"]["step_seconds"]
    assert {"draw", "select", "train", "plan", "evaluate", "seal", "drain"} <= set(steps)
    assert all(seconds >= 0 for seconds in steps.values())
    assert steps["train"] <= done["cost"]["wall_seconds"]
    # The gate and its no-personalisation floor are scored on the same sample of test users.
    tested = done["sample"]["test_users"]
    assert 0 < tested <= done["sample"]["test_limit"]
    assert done["metrics"]["migrated"]["n_users"] == tested
    assert done["metrics"]["baseline"]["n_users"] == tested
    meta = store.get_meta(model, version)
    assert meta.lineage["parents"] == done["request"]["sources"] or meta.lineage["parents"]
    assert meta.state == "sealed" and meta.count == len(expected)


def test_promotion_and_rollback_switch_in_one_step(client: TestClient, store: Store) -> None:
    source_version = store.resolve(SOURCE)[1]
    _activate(client, SOURCE, source_version, default=True)  # serve the source model by default
    done = wait_done(client, migrate(client, auto_promote=False)["id"])
    assert done["state"] == "awaiting_promotion"
    new_version = done["target"]["version"]
    old = {u: store.get_prompt(SOURCE, source_version, u) for u in ("u0", "u1")}
    new = {u: store.get_prompt(TARGET, new_version, u) for u in ("u0", "u1")}

    seen: list[tuple[str, str, bytes, str]] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            r = client.get("/users/u0/prompt", headers=reader())
            seen.append(
                (
                    r.headers["X-Prompt-Model"],
                    r.headers["X-Prompt-Version"],
                    r.content,
                    r.headers["X-Prompt-Digest"],
                )
            )

    reader_thread = threading.Thread(target=read)
    reader_thread.start()
    wait_for(lambda: len(seen) > 3, timeout=10)
    promoted = client.post(f"/migrations/{done['id']}/promote", headers=admin())
    assert promoted.status_code == 200 and promoted.json()["state"] == "promoted"
    wait_for(lambda: seen[-1][0] == TARGET, timeout=10)
    stop.set()
    reader_thread.join()
    for model, version, content, digest in seen:
        assert digest == "sha256:" + codec.digest(content)
        if model == SOURCE:
            assert (version, content) == (source_version, old["u0"])
        else:
            assert (model, version, content) == (TARGET, new_version, new["u0"])
    assert client.get("/users/u1/prompt", headers=reader()).content == new["u1"]
    # Rollback: serve the previous model's set to readers who name no model, saying so.
    _activate(client, SOURCE, source_version, default=True)
    assert client.get("/users/u1/prompt", headers=reader()).content == old["u1"]


def test_same_idempotency_key_gives_one_job(client: TestClient) -> None:
    headers = {"Idempotency-Key": "upgrade-2026-11"}
    first = migrate(client, headers=headers)
    second = migrate(client, headers=headers)
    assert first["id"] == second["id"]
    ids = [j["id"] for j in client.get("/migrations", headers=reader()).json()["jobs"]]
    assert ids.count(first["id"]) == 1
    different = client.post(
        "/migrations",
        json={"sources": [{"model": SOURCE}], "target": TARGET, "dataset": "movielens-1m"},
        headers=admin() | headers,
    )
    assert different.status_code == 409
    wait_done(client, first["id"])


def test_cancel_stops_job_and_keeps_active_set(client: TestClient, store: Store) -> None:
    before = store.active_pointers()
    created = migrate(client, adapter={"epochs": 50, "hidden": 16}, chunk_size=1)
    wait_for(lambda: job(client, created["id"])["stage"] in ("training", "mapping"), timeout=60)
    response = client.post(f"/migrations/{created['id']}/cancel", headers=admin())
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    done = wait_done(client, created["id"], timeout=60)
    assert done["state"] == "cancelled"
    assert store.active_pointers() == before
    target = done["target"]
    assert store.count_keys(target["model"], target["version"]) == 0
    again = client.post(f"/migrations/{created['id']}/cancel", headers=admin())
    assert again.status_code == 409


def test_chained_and_aggregated_migration_lineage(client: TestClient, store: Store) -> None:
    first = wait_done(client, migrate(client)["id"])
    assert first["state"] == "promoted"
    chained_sources = [{"model": TARGET, "version": first["target"]["version"]}]
    both = [*chained_sources, {"model": SOURCE}]
    body = {"sources": both, "target": "tiny-llama-b"}
    response = client.post(
        "/models", json={"name": "tiny-llama-b", "checkpoint": "tiny-llama"}, headers=admin()
    )
    assert response.status_code in (200, 201)
    done = wait_done(client, migrate(client, **body)["id"])
    assert done["state"] == "promoted", done
    meta = store.get_meta("tiny-llama-b", done["target"]["version"])
    parents = {(p["model"], p["version"]) for p in meta.lineage["parents"]}
    assert (TARGET, first["target"]["version"]) in parents and len(parents) == 2
    assert_exact_set(
        store, "tiny-llama-b", done["target"]["version"], expected_prompts(store, done["id"])
    )


def test_instant_migration_maps_everyone_with_no_training(client: TestClient, store: Store) -> None:
    body = {
        "sources": [{"model": SOURCE}],
        "target": TARGET,
        "dataset": DATASET,
        "method": "instant",
        "quality_gate": {"tolerance": 100.0},
        "auto_promote": False,
    }
    response = client.post("/migrations", json=body, headers=admin())
    assert response.status_code == 201, response.text
    done = wait_done(client, response.json()["id"])
    assert done["state"] == "awaiting_promotion", done
    cost = done["cost"]
    assert cost["train_seconds"] == 0 and cost["example_passes"] == 0
    assert cost["users_trained"] == 0 and cost["inference_passes"] > 0
    # The stored adapter is the vocabulary map, and every source user got its output.
    adapter = adapter_from_bytes(store.get_blob(done["id"], "adapter") or b"")
    assert adapter.config.linear_only
    source = store.get_job(done["id"])["sources"][0]
    source_set = load_set(source["model"], source["version"], db=store)
    vocab_map = fit_vocab_map(FoundationModel.load(SOURCE), FoundationModel.load(TARGET))
    expected = expected_prompts(store, done["id"])
    assert sorted(expected) == sorted(source_set.user_ids)
    for user in source_set.user_ids[:3]:
        got = np.frombuffer(expected[user], "<f4")
        want = vocab_map(source_set.rows([user]))[0, 0].numpy()
        assert np.allclose(got, want, rtol=1e-4, atol=1e-5), user
    model, version = done["target"]["model"], done["target"]["version"]
    assert_exact_set(store, model, version, expected)
    assert store.get_meta(model, version).lineage["method"] == "instant"
    # The head was refitted to read the target: not the source head carried over.
    source_head = load_set(source["model"], source["version"], users=[], db=store).head
    migrated_head = load_set(model, version, users=[], db=store).head
    assert any(not torch.equal(source_head[k], migrated_head[k]) for k in source_head)
    assert set(done["metrics"]["migrated"]) >= {"rmse", "mae"}


def test_ready_with_redis_and_a_worker(client: TestClient) -> None:
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["workers"] >= 1
    metrics = client.get("/metrics").text
    assert "pm_http_requests_total" in metrics and "pm_prompts_served_total" in metrics


def test_adapter_statistics_cover_the_sample_of_the_source_users(
    client: TestClient, store: Store, env: dict[str, Any]
) -> None:
    done = wait_done(client, migrate(client, auto_promote=False)["id"])
    assert done["state"] == "awaiting_promotion", done
    assert done["cost"]["users_trained"] == 8
    # the request's options over the budget recipe, fitted to the sample of the source's users
    assert done["recipe"]["adapter"]["hidden"] == 16
    assert done["recipe"]["adapter"]["distill_weight"] == recipe.BUDGET.distill_weight
    assert done["recipe"]["chosen"]["input_rank"] == done["recipe"]["adapter"]["input_rank"]
    trained = adapter_from_bytes(store.get_blob(done["id"], "adapter") or b"")
    source = store.get_job(done["id"])["sources"][0]
    everyone = store.set_users(source["model"], source["version"])
    limit = env["settings"].sample_users
    drawn = sample(everyone, limit=limit, seed=0)
    assert done["sample"]["population"] == len(everyone) == done["progress"]["users_total"]
    assert done["sample"]["statistics_users"] == len(drawn) == min(limit, len(everyone))
    assert done["sample"]["limit"] == limit
    assert len(drawn) > 8  # the population the adapter maps, not the 8 it trained on
    table = load_set(source["model"], source["version"], users=drawn, db=store).prompts
    flat = table.reshape(-1, table.shape[-1])
    torch.testing.assert_close(trained.input_mean, flat.mean(0))


def test_adapter_trains_on_each_users_latest_interactions_when_capped(
    client: TestClient,
) -> None:
    adapter = {"epochs": 1, "hidden": 16, "max_train_per_user": 2, "distill_weight": 0.0}
    done = wait_done(client, migrate(client, adapter=adapter, auto_promote=False)["id"])
    assert done["state"] in FINISHED, done
    assert done["cost"]["users_trained"] == 8
    assert done["recipe"]["adapter"]["max_train_per_user"] == 2
    # The head's warm-up and one epoch, each over at most 2 interactions of 8 users.
    assert 0 < done["cost"]["example_passes"] <= 2 * 8 * 2


def test_adapter_reads_the_requested_principal_directions(client: TestClient, store: Store) -> None:
    adapter = FAST_ADAPTER | {"input_rank": 4}
    done = wait_done(client, migrate(client, adapter=adapter, auto_promote=False)["id"])
    assert done["state"] == "awaiting_promotion", done
    trained = adapter_from_bytes(store.get_blob(done["id"], "adapter") or b"")
    assert trained.input_basis is not None
    assert trained.input_basis.shape == (trained.config.d_in, 4)
    assert trained.skip is not None and trained.skip.weight.shape[1] == 4


def test_distilling_adapter_pays_one_source_pass_per_training_example(
    client: TestClient,
) -> None:
    def passes(distill_weight: float) -> int:
        adapter = {
            "epochs": 1,
            "hidden": 16,
            "max_train_per_user": 2,
            "distill_weight": distill_weight,
        }
        done = wait_done(client, migrate(client, adapter=adapter, auto_promote=False)["id"])
        assert done["state"] in FINISHED, done
        return int(done["cost"]["example_passes"])

    assert passes(0.5) - passes(0.0) == 8 * 2  # the budget's users, 2 interactions each


def test_adapter_started_at_zero_is_its_own_start_and_reproduces(
    client: TestClient, store: Store
) -> None:
    def adapter_state(*, start_from_vocab_map: bool) -> dict[str, torch.Tensor]:
        adapter = FAST_ADAPTER | {"start_from_vocab_map": start_from_vocab_map}
        done = wait_done(client, migrate(client, adapter=adapter, auto_promote=False)["id"])
        assert done["state"] == "awaiting_promotion", done
        return adapter_from_bytes(store.get_blob(done["id"], "adapter") or b"").state_dict()

    at_zero = adapter_state(start_from_vocab_map=False)
    for name, value in adapter_state(start_from_vocab_map=False).items():
        torch.testing.assert_close(value, at_zero[name], rtol=0, atol=0, msg=name)
    at_map = adapter_state(start_from_vocab_map=True)
    assert not torch.equal(at_map["skip.weight"], at_zero["skip.weight"])


def test_puma_trains_with_post_stratified_weights_unless_asked_not_to(
    client: TestClient, store: Store
) -> None:
    def stored(post_stratify: bool) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        selection = {"strategy": "puma", "budget": 8, "post_stratify": post_stratify}
        done = wait_done(client, migrate(client, selection=selection, auto_promote=False)["id"])
        assert done["state"] == "awaiting_promotion", done
        weights = json.loads(store.get_blob(done["id"], "selected") or b"{}")
        adapter = adapter_from_bytes(store.get_blob(done["id"], "adapter") or b"")
        return weights, adapter.state_dict()

    weighted, weighted_adapter = stored(True)
    plain, plain_adapter = stored(False)
    assert list(weighted) == list(plain) and len(plain) == 8  # the same users either way
    assert set(plain.values()) == {1.0}
    assert np.isclose(np.mean(list(weighted.values())), 1.0)
    assert len(set(weighted.values())) > 1  # the tiny population's clusters differ in size
    assert any(not torch.equal(v, plain_adapter[k]) for k, v in weighted_adapter.items())


def test_float16_set_is_stored_and_served_at_half_width(client: TestClient, store: Store) -> None:
    done = wait_done(client, migrate(client, dtype="float16", auto_promote=False)["id"])
    assert done["state"] == "awaiting_promotion", done
    version = done["target"]["version"]
    response = client.get(f"/users/u0/prompt?model={TARGET}&version={version}", headers=reader())
    assert response.headers["X-Prompt-Dtype"] == "float16"
    width = int(response.headers["X-Prompt-Shape"].split(",")[1])
    assert len(response.content) == 2 * width
    expected = np.frombuffer(expected_prompts(store, done["id"])["u0"], "<f4")
    assert np.allclose(np.frombuffer(response.content, "<f2"), expected, rtol=1e-2, atol=1e-3)


def test_erasure_during_a_migration_holds_and_the_set_still_seals(
    client: TestClient, store: Store
) -> None:
    created = migrate(client, chunk_size=4)  # the worker waits 0.3 s before each chunk
    wait_for(lambda: store.chunks_done(created["id"]), timeout=120, what="a first chunk")
    chunks = store.plan_size(created["id"])
    written = store.plan_chunk(created["id"], min(store.chunks_done(created["id"])))[-1]
    planned = store.plan_chunk(created["id"], chunks - 1)[-1]  # likely not mapped yet: skipped
    for user in (written, planned):
        assert client.delete(f"/users/{user}", headers=admin()).status_code == 200
    done = wait_done(client, created["id"])
    assert done["state"] == "promoted", done
    model, version = done["target"]["model"], done["target"]["version"]
    expected = expected_prompts(store, done["id"])  # the sources no longer hold either user
    assert {written, planned}.isdisjoint(expected)
    assert_exact_set(store, model, version, expected)
    assert store.get_meta(model, version).count == len(expected)
    assert done["cost"]["users_mapped"] == len(expected)
    assert done["cost"]["users_erased_during_run"] == 2
    for user in (written, planned):
        assert client.get(f"/users/{user}/prompt", headers=reader()).status_code == 404


def test_a_user_onboarded_during_a_migration_is_in_the_new_set(
    client: TestClient, store: Store
) -> None:
    created = migrate(client, chunk_size=4)  # the worker waits 0.3 s before each chunk
    wait_for(lambda: store.chunks_done(created["id"]), timeout=120, what="a first chunk")
    source = store.get_job(created["id"])["sources"][0]
    assert store.resolve(SOURCE)[1] == source["version"]  # PUT onboards onto the active set
    shape = store.get_meta(source["model"], source["version"]).shape
    value = np.random.default_rng(0).standard_normal(shape).astype("<f4")
    response = client.put(
        "/users/late-user/prompt",
        params={"model": SOURCE},
        content=value.tobytes(),
        headers=admin(),
    )
    assert response.status_code in (200, 201), response.text
    done = wait_done(client, created["id"])
    assert done["state"] == "promoted", done
    model, version = done["target"]["model"], done["target"]["version"]
    expected = expected_prompts(store, done["id"])
    assert "late-user" in expected
    assert_exact_set(store, model, version, expected)
    assert store.get_meta(model, version).count == len(expected)
    assert done["cost"]["users_onboarded_during_run"] == 1
    assert done["cost"]["users_mapped"] == len(expected)
    # Readers of this module's default model (the chained test's target) stay on it: ask for
    # the migration's target by name.
    served = client.get("/users/late-user/prompt", params={"model": TARGET}, headers=reader())
    assert served.status_code == 200, served.text
    assert served.headers["X-Prompt-Version"] == version
    assert client.delete("/users/late-user", headers=admin()).status_code == 200
