"""The worker's share of a host it has with serving: its torch threads (its priority is checked on
a real worker in test_health.py)."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from app.config import Settings
from workers.priority import model_threads


def test_model_threads_leave_one_core_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    assert model_threads(5) == 5
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3})
    assert model_threads(None) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0})
    assert model_threads(None) == 1  # one core: the model stages still get a thread


def test_pm_model_threads_is_a_positive_count(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(environment="test").model_threads is None
    monkeypatch.setenv("PM_MODEL_THREADS", "2")
    assert Settings(environment="test").model_threads == 2
    monkeypatch.setenv("PM_MODEL_THREADS", "0")
    with pytest.raises(ValidationError, match="model_threads"):
        Settings(environment="test")
