"""Driving jobs over HTTP in worker tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from fastapi.testclient import TestClient
from prompt_migration_client.jobs import follow_job
from redis import Redis

from app.config import Settings
from app.main import create_app
from app.store import Store
from tests.conftest import Delays, Worker, admin, reader

SOURCE, TARGET, DATASET = "tiny-llama", "tiny-gemma", "synthetic-tiny"
FAST_ADAPTER = {"epochs": 2, "hidden": 16}
# Enough for the tiny source to learn each user's taste, so its migrated set beats the quality
# gate's no-personalisation floor (2 epochs leave it level with the global mean).
SOURCE_EPOCHS = 20


def register(client: TestClient, *names: str) -> None:
    for name in names:
        response = client.post("/models", json={"name": name}, headers=admin())
        assert response.status_code in (200, 201), response.text


def job(client: TestClient, job_id: str) -> dict[str, Any]:
    response = client.get(f"/migrations/{job_id}", headers=reader())
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_done(
    client: TestClient, job_id: str, *, timeout: float = 240, worker_log: Path | None = None
) -> dict[str, Any]:
    """The job's record once it ends; on a timeout the error shows where it stood, and the end of
    the worker's log when given, so a slow or stuck run can be told apart after the fact."""
    try:
        return follow_job(lambda: job(client, job_id), interval_s=0.2, timeout_s=timeout)
    except TimeoutError as error:
        tail = worker_log.read_text(errors="replace")[-4000:] if worker_log else ""
        raise AssertionError(f"{error}\n{tail}") from None


def train_source(
    client: TestClient, *, model: str = SOURCE, epochs: int = SOURCE_EPOCHS
) -> dict[str, Any]:
    body = {"dataset": DATASET, "task": "rating", "epochs": epochs}
    response = client.post(f"/models/{model}/train", json=body, headers=admin())
    assert response.status_code == 201, response.text
    done = wait_done(client, response.json()["id"])
    assert done["state"] == "succeeded", done
    return done


def migration_body() -> dict[str, Any]:
    """A SOURCE -> TARGET migration of the tiny models that trains fast and always promotes."""
    return {
        "sources": [{"model": SOURCE}],
        "target": TARGET,
        "dataset": DATASET,
        "selection": {"strategy": "puma", "budget": 8},
        "adapter": FAST_ADAPTER,
        "quality_gate": {"tolerance": 100.0},
    }


def migrate(client: TestClient, **overrides: Any) -> dict[str, Any]:
    headers = admin() | overrides.pop("headers", {})
    response = client.post("/migrations", json=migration_body() | overrides, headers=headers)
    assert response.status_code in (200, 201), response.text
    return dict(response.json())


def expected_prompts(store: Store, job_id: str) -> dict[str, bytes]:
    """What every user's migrated prompt must be: the stored adapter applied to the sources."""
    from models.adapter.model import adapter_from_bytes
    from models.migration import map_prompts
    from workers.stage_io import encode_rows, load_set

    record = store.get_job(job_id)
    adapter = adapter_from_bytes(store.get_blob(job_id, "adapter") or b"")
    sets = [load_set(s["model"], s["version"], db=store) for s in record["sources"]]
    users = sorted(set.intersection(*(set(s.user_ids) for s in sets)))
    stacked = torch.cat([s.rows(users) for s in sets], dim=-1)
    return dict(encode_rows(users, map_prompts(adapter, stacked)))


def assert_exact_set(store: Store, model: str, version: str, expected: dict[str, bytes]) -> None:
    assert store.count_keys(model, version) == len(expected)
    assert store.set_users(model, version) == sorted(expected)
    values = store.get_prompts(model, version, sorted(expected))
    for user, value in zip(sorted(expected), values, strict=True):
        assert value is not None
        got = np.frombuffer(value, "<f4")
        want = np.frombuffer(expected[user], "<f4")
        assert np.allclose(got, want, rtol=1e-5, atol=1e-6), user


class Service(NamedTuple):
    client: TestClient
    store: Store
    worker: Worker
    source: dict[str, Any]  # the finished job that trained the source set


@contextlib.contextmanager
def service_with_source(
    settings: Settings, worker_log: Path, *, delays: Delays | None = None
) -> Iterator[Service]:
    """A real worker (slowed down by ``delays``) and the API on ``settings`` (store already
    emptied by the caller, broker emptied here), both models registered and the source set
    trained."""
    Redis.from_url(settings.broker).flushdb()
    worker = Worker(settings, worker_log, delays=delays)
    worker.start()
    app = create_app(settings)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            register(client, SOURCE, TARGET)
            yield Service(client, app.state.store, worker, train_source(client))
    finally:
        worker.stop()
