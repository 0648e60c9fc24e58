"""Shared fixtures: a real redis-server on a free port, the API client, real Celery workers."""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from prompt_migration_client import codec
from redis import Redis
from safetensors.torch import save as save_tensors

from app.config import Settings
from app.dev.local_redis import LocalRedis, LocalRedisCluster
from app.jobs.queue import worker_command
from app.store import SetMeta, Store

ROOT = Path(__file__).resolve().parents[1]
# The service defaults to production; the tests, and the processes they start, are a test run.
os.environ["PM_ENVIRONMENT"] = "test"
# The workers' kept item states: one directory per test session, not the user's cache.
ITEM_STATES = tempfile.mkdtemp(prefix="pm-test-item-states-")
atexit.register(shutil.rmtree, ITEM_STATES, ignore_errors=True)
os.environ["PM_ITEM_STATE_DIR"] = ITEM_STATES
ADMIN = "test-admin-token-0123456789abcdef0123456789"
READER = "test-read-token-0123456789abcdef01234567890"
STORE_DB, BROKER_DB = 0, 1


class RedisServer(LocalRedis):
    """The tests' redis-server; the store lives in db ``STORE_DB``."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        super().__init__(binary, workdir)

    def url(self, db: int = STORE_DB) -> str:
        return super().url(db)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


class RedisClusterServer(LocalRedisCluster):
    """A real three-node Redis Cluster: what the store's hash tags and the read path must work
    on."""

    def __init__(self, workdir: Path, *, node_timeout_ms: int = 15000) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        super().__init__(binary, workdir, node_timeout_ms=node_timeout_ms)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServer]:
    cluster = RedisClusterServer(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# `make test-fast` leaves these out: they run real workers, real models or whole services.
SLOW_PARTS = (
    "tests/workers/",
    "tests/integration/",
    "tests/bench/",
    "tests/test_run_faults.py",
    "tests/test_compose.py",  # starts the compose file's store Redis
    "tests/models/test_distill.py",  # trains adapters end to end
    "tests/models/test_end_to_end.py",
    "tests/app/test_probes.py",  # a real uvicorn process
    "tests/app/test_body_memory.py",
    "tests/app/test_redis_outage.py",  # stops and restarts Redis and a Cluster node
    "tests/app/test_cli.py::test_a_job_is_followed_until_it_ends",  # a real worker
    "tests/app/test_settings.py::test_api_process_refuses",  # a fresh interpreter imports the app
    "tests/app/test_settings.py::test_a_deployment_that_names_no_environment",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith(SLOW_PARTS):
            item.add_marker(pytest.mark.slow)


def make_settings(server: RedisServer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "test",
        "redis_url": server.url(STORE_DB),
        "broker_url": server.url(BROKER_DB),
        "result_backend": server.url(BROKER_DB),
        "admin_token": ADMIN,
        "read_token": READER,
        "redis_timeout_s": 1.0,
        "max_body_bytes": 64 * 1024,
        "model_threads": 1,  # as OMP_NUM_THREADS below: tests share the machine's cores
    }
    return Settings(**(values | overrides))


def worker_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        env[f"PM_{name.upper()}"] = (
            value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
        )
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return env


@pytest.fixture
def settings(redis_server: RedisServer) -> Settings:
    return make_settings(redis_server)


@pytest.fixture
def store_redis(redis_server: RedisServer) -> Iterator[Redis]:
    client = Redis.from_url(redis_server.url(STORE_DB))
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def single_client(settings: Settings, store_redis: Redis) -> Iterator[TestClient]:
    """The API on the plain test Redis."""
    from app.main import create_app

    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def client(single_client: TestClient) -> TestClient:
    return single_client


@pytest.fixture
def cluster_client(
    redis_server: RedisServer, redis_cluster: RedisClusterServer
) -> Iterator[TestClient]:
    """The API on the Redis Cluster (Celery stays on the plain test Redis, as it must)."""
    from app.main import create_app

    redis_cluster.flush()
    settings = make_settings(redis_server, redis_url=redis_cluster.url(), redis_cluster=True)
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(params=["redis", "redis-cluster"])
def either_client(request: pytest.FixtureRequest) -> TestClient:
    """The API on a single Redis, then on a Redis Cluster: modules that take their ``client``
    from this run every test on both."""
    name = "single_client" if request.param == "redis" else "cluster_client"
    test_client: TestClient = request.getfixturevalue(name)
    return test_client


def seed_set(
    store: Store,
    *,
    model: str,
    users: list[str],
    shape: tuple[int, int] = (1, 8),
    seed: int = 0,
    activate: bool = True,
) -> tuple[str, dict[str, bytes]]:
    """A sealed prompt set written straight through the store (no worker needed)."""
    if model not in {m["name"] for m in store.list_models()}:
        store.put_model(model, {"name": model, "checkpoint": model, "registered_at": time.time()})
    version = store.allocate_version(model)
    rng = np.random.default_rng(seed)
    items = [(u, codec.encode(rng.normal(size=shape), "float32")) for u in users]
    store.begin_set(SetMeta(model=model, version=version, task="rating", shape=list(shape)))
    store.put_head(model, version, save_tensors({"w": torch.zeros(2)}))
    store.write_prompts(model, version, items)
    store.seal_set(
        model, version, expected_count=len(items), expected_digest=codec.set_digest(items)
    )
    if activate:
        store.activate(model, version)
    return version, dict(items)


@pytest.fixture
def store(client: TestClient) -> Store:
    s: Store = client.app.state.store  # type: ignore[attr-defined]
    return s


def read_burst_errors(
    client: TestClient, store: Store, values: dict[str, bytes], *, tasks: int = 16, reads: int = 100
) -> list[BaseException]:
    """``tasks`` concurrent readers of the active set on the API's event loop, ``reads`` each;
    the first error of each reader that failed (a wrong value counts)."""
    users = sorted(values)

    async def read_many(worker: int) -> None:
        for i in range(reads):
            user = users[(worker + i) % len(users)]
            _, (value,) = await store.read_prompts(None, None, [user])
            assert value == values[user]

    async def burst() -> list[BaseException]:
        done = await asyncio.gather(*(read_many(w) for w in range(tasks)), return_exceptions=True)
        return [error for error in done if isinstance(error, BaseException)]

    assert client.portal is not None, "start the client first (with TestClient(...) as client)"
    return client.portal.call(burst)


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


def reader() -> dict[str, str]:
    return {"Authorization": f"Bearer {READER}"}


@dataclass(frozen=True)
class Delays:
    """Test-only slow-downs of a worker's stages, in seconds (tests/slow_worker.py): room to kill
    the worker, stop the store or write users inside a stage."""

    chunk: float = 0.0  # before each chunk's users are mapped
    stage: float = 0.0  # once the adapter's training starts
    load: float = 0.0  # in the loading stage, once the members are listed

    def env(self) -> dict[str, str]:
        return {
            "TEST_CHUNK_DELAY_S": str(self.chunk),
            "TEST_STAGE_DELAY_S": str(self.stage),
            "TEST_LOAD_DELAY_S": str(self.load),
        }


class Worker:
    """``celery -A workers.celery_app worker -Q gpu,default --pool solo`` as a subprocess; with
    ``delays``, the app of tests/slow_worker.py instead."""

    def __init__(self, settings: Settings, log: Path, *, delays: Delays | None = None) -> None:
        self.settings = settings
        self.delays = delays
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.name = f"test-{uuid.uuid4().hex[:8]}"  # the node is name@hostname

    def start(self, *, wait: bool = True) -> None:
        """Start, and unless ``wait`` is False wait until it answers a ping (which a solo worker
        busy with a task does only once the task ends)."""
        env = worker_env(self.settings) | (self.delays.env() if self.delays else {})
        app = "tests.slow_worker" if self.delays else "workers.celery_app"
        args = worker_command(app=app, node=f"{self.name}@%h")
        args += ["--without-gossip", "--without-mingle"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=out)
        if wait:
            self._wait_ready()

    def _wait_ready(self) -> None:
        from app.jobs.queue import make_celery

        celery = make_celery(self.settings)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited: {self.log.read_text()[-3000:]}")
            if celery.control.ping(timeout=0.5):
                return
        raise RuntimeError(f"worker not ready: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(
        settings: Settings, *, flush_broker: bool = True, delays: Delays | None = None
    ) -> Worker:
        if flush_broker:  # queued messages of earlier tests' jobs must not reach this worker
            Redis.from_url(settings.broker).flushdb()
        worker = Worker(settings, tmp_path / f"worker-{len(workers)}.log", delays=delays)
        worker.start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def wait_for(
    predicate: Callable[[], Any], *, timeout: float = 120, interval: float = 0.2, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what or predicate}")
