"""The operator CLI against the real API and a real worker."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prompt_migration_client import NotFound, cli
from prompt_migration_client.operator import OperatorClient
from typer.testing import CliRunner

from app.config import Settings
from app.store import Store
from tests.app.sets import model_set
from tests.conftest import ADMIN, Worker


@pytest.fixture
def run_cli(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """``prompt-migration ARGS`` with its client talking to the test API."""
    monkeypatch.setattr(
        cli, "make_client", lambda url, token: OperatorClient(token=ADMIN, http=client)
    )

    def run(*args: str) -> str:
        result = CliRunner().invoke(cli.cli, list(args), catch_exceptions=True)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        assert result.exit_code == 0, result.output
        return result.output

    return run


def test_sets_move_out_and_in_and_versions_roll_back(
    run_cli: Callable[..., str], store: Store, tmp_path: Path
) -> None:
    old, _ = model_set(store, seed=1)
    new, _ = model_set(store, seed=2)
    assert f"active={new}" in run_cli("models")
    assert json.loads(run_cli("bundle", "tiny-gemma", old, "--metrics")) == {"test": {"rmse": 1.0}}
    out = run_cli("export", "tiny-gemma", old, str(tmp_path / "old.safetensors"))
    assert "bytes" in out and (tmp_path / "old.safetensors").exists()
    imported = run_cli("import", "tiny-gemma", str(tmp_path / "old.safetensors"), "--activate")
    version = json.loads(imported[imported.index("{") :])["version"]
    assert store.active_pointers()["tiny-gemma"] == version
    assert json.loads(run_cli("rollback", "tiny-gemma", old))["previous_version"] == version
    model_set(store, model="tiny-llama", seed=3)
    assert store.active_pointers()["__default__"] == "tiny-gemma"
    switched = json.loads(run_cli("rollback", "tiny-llama", "1", "--default"))
    assert switched["default_model"] == "tiny-llama"
    with pytest.raises(NotFound, match="its versions"):
        run_cli("bundle", "tiny-gemma", "99")


def test_a_job_is_followed_until_it_ends(
    run_cli: Callable[..., str],
    settings: Settings,
    start_worker: Callable[[Settings], Worker],
) -> None:
    start_worker(settings)
    run_cli("register", "tiny-llama")
    out = run_cli("train", "tiny-llama", "--dataset", "synthetic-tiny", "--epochs", "1")
    assert "succeeded" in out and '"rmse"' in out
