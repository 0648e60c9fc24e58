"""docker-compose.yml and the entrypoints point at modules and attributes that exist."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prompt_migration_client.functions import READ
from redis import Redis
from redis.exceptions import AuthenticationError, NoPermissionError
from redis.exceptions import ConnectionError as RedisConnectionError

from app.config import Settings
from app.dev.local_redis import free_port
from app.store import SEALED, WRITING, SetMeta, Store
from app.store.keys import ACTIVE, SetKeys
from tests.conftest import wait_for

yaml = pytest.importorskip("yaml")
ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _target(command: list[str]) -> str | None:
    """The ``module:attr`` a uvicorn or celery command line runs."""
    if command[0] == "uvicorn":
        return command[1]
    if command[0] == "celery":
        return command[command.index("-A") + 1]
    return None


def _resolve(target: str) -> object:
    module, _, attr = target.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attr or "app")


def test_services_and_infrastructure() -> None:
    services = _compose()["services"]
    assert {"store", "broker", "api", "worker", "flower"} <= set(services)
    assert "noeviction" in services["broker"]["command"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "--pool" in services["worker"]["command"]
    assert services["api"]["environment"]["PM_ENVIRONMENT"] == "production"


@pytest.mark.parametrize("name", ["api", "worker", "flower"])
def test_service_command_points_at_existing_code(name: str) -> None:
    service = _compose()["services"][name]
    target = _target(service["command"])
    assert target is not None
    assert _resolve(target) is not None
    dockerfile = ROOT / service["build"]["dockerfile"]
    assert dockerfile.is_file()


@pytest.mark.parametrize("script", ["entrypoint-api.sh", "entrypoint-worker.sh"])
def test_entrypoints_use_the_same_targets(script: str) -> None:
    text = (ROOT / "docker" / script).read_text()
    line = next(x for x in text.splitlines() if x.startswith("exec "))
    target = _target(line.split()[1:])
    assert target in ("app.main:app", "workers.celery_app")
    assert _resolve(target) is not None
    assert (
        f"/usr/local/bin/{script}"
        in (ROOT / "docker")
        .joinpath("Dockerfile.api" if "api" in script else "Dockerfile.worker")
        .read_text()
    )


def test_every_service_restarts_when_it_exits() -> None:
    for name, service in _compose()["services"].items():
        assert service.get("restart") in ("unless-stopped", "always"), name


def test_both_redis_keep_an_append_only_file() -> None:
    services = _compose()["services"]
    for name in ("store", "broker"):
        command = services[name]["command"]
        assert command[command.index("--appendonly") + 1] == "yes", name
        assert command[command.index("--appendfsync") + 1] == "everysec", name
        assert any(volume.endswith(":/data") for volume in services[name]["volumes"]), name


def test_the_api_and_the_workers_wait_for_a_healthy_broker() -> None:
    services = _compose()["services"]
    for name in ("api", "worker", "flower"):
        assert services[name]["depends_on"]["broker"] == {"condition": "service_healthy"}, name


def test_the_worker_healthcheck_pings_the_worker_by_its_own_node_name() -> None:
    worker = _compose()["services"]["worker"]
    command = worker["command"]
    assert command[command.index("-n") + 1] == "worker@%h"
    assert worker["healthcheck"]["test"] == ["CMD", "python", "-m", "workers.health"]
    from workers.health import node_name

    # Celery expands %h to the hostname, which is what the check addresses.
    assert node_name("abc123") == "worker@abc123"


ENV = {
    "PM_STORE_PASSWORD": "store-secret",
    "PM_BROKER_PASSWORD": "broker-secret",
    "PM_READER_PASSWORD": "reader-secret",
    "PM_FLOWER_PASSWORD": "flower-secret",
}


def _interpolate(text: str) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` with ``ENV``."""

    def value(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if name in ENV:
            return ENV[name]
        assert op == ":-", f"{name} has no default and must be set"
        return str(arg)

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", value, text)


def test_flower_asks_for_a_password_and_is_not_published_to_the_network() -> None:
    flower = _compose()["services"]["flower"]
    assert any(arg.startswith("--basic-auth=") for arg in flower["command"])
    assert all(port.startswith("127.0.0.1:") for port in flower["ports"])


@pytest.fixture
def store_server(tmp_path: Path) -> Iterator[int]:
    """The compose file's store Redis, its command line as written, on a free local port."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    command = [_interpolate(arg) for arg in _compose()["services"]["store"]["command"]]
    port = free_port()
    proc = subprocess.Popen(
        [binary, *command[1:], "--port", str(port), "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    try:
        service = Redis(port=port, username="pm-service", password=ENV["PM_STORE_PASSWORD"])
        wait_for(lambda: _answers(service), timeout=20, what="the store Redis")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _answers(client: Redis) -> bool:
    try:
        return bool(client.ping())
    except RedisConnectionError:
        return False


def test_the_store_has_password_users_and_a_memory_cap(store_server: int) -> None:
    with pytest.raises(AuthenticationError):
        Redis(port=store_server).set("pm:x", "1")  # the default user is off
    service = Redis(port=store_server, username="pm-service", password=ENV["PM_STORE_PASSWORD"])
    assert service.set("pm:x", "1")
    assert service.config_get("maxmemory") == {"maxmemory": str(16 * 1024**3)}
    assert service.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    reader = Redis(port=store_server, username="pm-reader", password=ENV["PM_READER_PASSWORD"])
    with pytest.raises(NoPermissionError):
        reader.set("pm:x", "2")
    with pytest.raises(AuthenticationError):
        Redis(port=store_server, username="pm-reader", password="wrong").ping()


def test_the_store_reader_gets_the_readable_sets_that_the_service_grants(
    store_server: int,
) -> None:
    service = Redis(port=store_server, username="pm-service", password=ENV["PM_STORE_PASSWORD"])
    reader = Redis(port=store_server, username="pm-reader", password=ENV["PM_READER_PASSWORD"])
    users = _compose()["x-env"]["PM_READER_ACL_USERS"]
    assert Settings(environment="test", reader_acl_users=users).reader_acl_users == ["pm-reader"]
    store = Store(service, reader_acl_users=["pm-reader"])
    store.load_functions()
    for state, version in ((SEALED, "1"), (WRITING, "2")):
        store.put_model("m", {"name": "m"})
        store.begin_set(SetMeta(model="m", version=version, task="rating", shape=[1, 1]))
        store.redis.hset(SetKeys("m", version).meta, "state", state)
        store.redis.set(SetKeys("m", version).value("u"), b"v")
    with pytest.raises(NoPermissionError):  # the base rules grant no set
        reader.get(SetKeys("m", "1").value("u"))
    assert store.sync_reader_acl()  # pm-service may set the reader's grants
    assert reader.fcall_ro(READ, 1, ACTIVE, "m", "1", "u") == [3, b"m", b"1", b"v"]
    assert reader.get(SetKeys("m", "1").value("u")) == b"v"
    for attempt in (("GET", SetKeys("m", "2").value("u")), ("SCRIPT", "LOAD", "return 1")):
        with pytest.raises(NoPermissionError):
            reader.execute_command(*attempt)
