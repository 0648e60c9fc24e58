"""The worker's share of a host it has with serving: its torch threads (its priority is checked on
a real worker in test_health.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import Settings
from workers.priority import cpu_quota, model_threads, usable_cores


def test_model_threads_leave_one_core_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    assert model_threads(5) == 5
    monkeypatch.setattr("workers.priority.cpu_quota", lambda *_: None)
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


def cgroup(tmp_path: Path, membership: str, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "membership").write_text(membership)
    return tmp_path / "membership"


@pytest.mark.parametrize(
    ("membership", "files", "cores"),
    [
        ("0::/\n", {"cpu.max": "250000 100000\n"}, 2.5),
        ("0::/pod/app\n", {"pod/app/cpu.max": "100000 100000\n"}, 1.0),
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),
        (
            "4:memory:/x\n2:cpu,cpuacct:/\n0::/\n",
            {"cpu,cpuacct/cpu.cfs_quota_us": "300000", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
            3.0,
        ),
        (
            "2:cpu,cpuacct:/\n",
            {"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
            None,
        ),
        ("0::/\n", {}, None),  # no CPU controller mounted
    ],
    ids=["v2 quota", "v2 nested", "v2 unlimited", "v1 quota", "v1 unlimited", "none"],
)
def test_the_cgroup_cpu_quota_is_read_in_cores(
    tmp_path: Path, membership: str, files: dict[str, str], cores: float | None
) -> None:
    assert cpu_quota(tmp_path, cgroup(tmp_path, membership, files)) == cores


def test_a_cpu_quota_caps_the_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(64)))
    monkeypatch.setattr("workers.priority.cpu_quota", lambda *_: 2.5)
    assert usable_cores() == 3  # a part of a core is a thread's share of it
    assert model_threads(None) == 2
    monkeypatch.setattr("workers.priority.cpu_quota", lambda *_: None)
    assert usable_cores() == 64
