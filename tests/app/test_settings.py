from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from app.config import Settings


def test_production_refuses_missing_tokens() -> None:
    with pytest.raises(ValidationError, match="PM_ADMIN_TOKEN"):
        Settings(environment="production")


def test_production_refuses_default_tokens() -> None:
    with pytest.raises(ValidationError, match="default"):
        Settings(
            environment="production",
            admin_token=SecretStr("changeme"),
            read_token=SecretStr("x" * 40),
        )


def test_production_accepts_strong_tokens() -> None:
    settings = Settings(
        environment="production", admin_token=SecretStr("a" * 40), read_token=SecretStr("b" * 40)
    )
    assert settings.admin_token is not None


def test_development_generates_tokens() -> None:
    settings = Settings(environment="development")
    assert settings.admin_token is not None and settings.read_token is not None
    assert settings.admin_token != settings.read_token


def test_api_process_refuses_to_start_in_production_without_tokens() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PM_")}
    env["PM_ENVIRONMENT"] = "production"
    result = subprocess.run(
        [sys.executable, "-c", "import app.main"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "PM_ADMIN_TOKEN" in result.stderr


def test_a_deployment_that_names_no_environment_is_production() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PM_")}
    env |= {"PM_ADMIN_TOKEN": "same-token-" + "x" * 40, "PM_READ_TOKEN": "same-token-" + "x" * 40}
    result = subprocess.run(
        [sys.executable, "-c", "import app.main"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "must differ in production" in result.stderr


def test_cluster_needs_its_own_broker_and_result_backend() -> None:
    with pytest.raises(ValidationError, match="PM_BROKER_URL and PM_RESULT_BACKEND"):
        Settings(redis_url="redis://node-1:6379", redis_cluster=True)
    with pytest.raises(ValidationError, match="PM_BROKER_URL and PM_RESULT_BACKEND"):
        Settings(redis_cluster=True, broker_url="redis://broker:6379/0")
    node = "redis://node-1:6379"
    with pytest.raises(ValidationError, match="PM_BROKER_URL and PM_RESULT_BACKEND"):
        Settings(redis_url=node, redis_cluster=True, broker_url=node, result_backend=node)


def test_cluster_url_names_no_database() -> None:
    broker, backend = "redis://broker:6379/0", "redis://broker:6379/1"
    with pytest.raises(ValidationError, match="only database 0"):
        Settings(
            redis_url="redis://node-1:6379/2",
            redis_cluster=True,
            broker_url=broker,
            result_backend=backend,
        )
    settings = Settings(
        redis_url="redis://node-1:6379/0",
        redis_cluster=True,
        broker_url=broker,
        result_backend=backend,
    )
    assert settings.redis_cluster


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_item_state_dir_keeps_states_in_memory_only(value: str) -> None:
    settings = Settings.model_validate({"environment": "test", "item_state_dir": value})
    assert settings.item_state_dir is None


def test_the_worker_priority_is_idle_or_a_niceness(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PM_WORKER_PRIORITY", raising=False)
    assert Settings(environment="test").worker_priority == "idle"
    monkeypatch.setenv("PM_WORKER_PRIORITY", "12")
    assert Settings(environment="test").worker_priority == 12
    for wrong in ("fast", "20", "-1"):
        monkeypatch.setenv("PM_WORKER_PRIORITY", wrong)
        with pytest.raises(ValidationError, match="worker_priority"):
            Settings(environment="test")


def test_the_renamed_worker_nice_is_refused_with_its_new_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PM_WORKER_NICE", "10")
    with pytest.raises(ValidationError, match="set PM_WORKER_PRIORITY instead") as refused:
        Settings(environment="test")
    assert "PM_WORKER_PRIORITY=10" in str(refused.value)
    monkeypatch.delenv("PM_WORKER_NICE")
    assert Settings(environment="test").worker_nice is None
