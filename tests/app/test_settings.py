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


def test_production_refuses_the_test_slowdown() -> None:
    with pytest.raises(ValidationError, match="CHUNK_DELAY"):
        Settings(
            environment="production",
            admin_token=SecretStr("a" * 40),
            read_token=SecretStr("b" * 40),
            chunk_delay_s=1,
        )


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
