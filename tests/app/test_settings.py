from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.config import Settings


def test_production_refuses_missing_tokens() -> None:
    with pytest.raises(ValidationError, match="PM_ADMIN_TOKEN"):
        Settings(environment="production")


def test_production_refuses_default_tokens() -> None:
    with pytest.raises(ValidationError, match="default"):
        Settings(environment="production", admin_token="changeme", read_token="x" * 40)


def test_production_accepts_strong_tokens() -> None:
    settings = Settings(environment="production", admin_token="a" * 40, read_token="b" * 40)
    assert settings.admin_token is not None


def test_development_generates_tokens() -> None:
    settings = Settings(environment="development")
    assert settings.admin_token is not None and settings.read_token is not None
    assert settings.admin_token != settings.read_token
