"""docker-compose.yml and the entrypoints point at modules and attributes that exist."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest

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
