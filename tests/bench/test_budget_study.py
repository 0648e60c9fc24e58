"""The budget study runs on the smoke preset and never needs the test split."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench import budget, quality
from models.data import Splits


def test_budget_study_scores_validation_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def splits_without_test(preset: quality.Preset) -> Splits:
        return replace(quality.preset_splits(preset), test={})

    monkeypatch.setattr(budget, "preset_splits", splits_without_test)
    out = tmp_path / "budget.json"
    budget.main(
        [
            "--preset",
            "smoke",
            "--input-ranks",
            "none,4",
            "--budgets",
            "8:2,12:1:4:3",
            "--strategies",
            "puma",
            "--seeds",
            "0",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert result["split"] == "validation"
    assert set(result["reference"]) == {"user_mean", "source"}
    batch = quality.PRESETS["smoke"].budget_migration.batch_size
    cap = quality.PRESETS["smoke"].budget_migration.max_train_per_user  # the recipe's
    keys = ("input_rank", "budget", "epochs", "batch_size", "max_train_per_user")
    assert [tuple(r[k] for k in keys) for r in result["summary"]] == [
        (None, 8, 2, batch, cap),
        (None, 12, 1, 4, 3),
        (4, 8, 2, batch, cap),
        (4, 12, 1, 4, 3),
    ]
    for run in result["runs"]:
        assert run["lr"] == quality.PRESETS["smoke"].budget_migration.lr  # the preset's, by default
        assert 0 < run["val_rmse"] < 5 and 0 < run["val_rmse_unselected"] < 5
        assert run["example_passes"] > 0
    # The source's predictions, the head's warm-up and one epoch, each over at most 3
    # interactions of 12 users.
    capped = [r for r in result["runs"] if r["max_train_per_user"] == 3]
    assert capped and all(r["example_passes"] <= 3 * 12 * 3 for r in capped)


def test_budget_study_rejects_a_malformed_budget(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        budget.main(["--preset", "smoke", "--budgets", "80", "--out", "unused.json"])
    assert "write USERS:EPOCHS" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        budget.main(["--preset", "smoke", "--budgets", "80:2:0", "--out", "unused.json"])
    assert "USERS:EPOCHS:BATCH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        budget.main(["--preset", "smoke", "--budgets", "80:2:8:15:1", "--out", "unused.json"])
    assert "USERS:EPOCHS:BATCH:PER_USER" in capsys.readouterr().err
    for bad_lr in ("fast", "-1e-3"):
        with pytest.raises(SystemExit):
            budget.main(["--preset", "smoke", "--lrs", f"preset,{bad_lr}", "--out", "unused.json"])
        assert "write a positive number such as 1e-3" in capsys.readouterr().err


def test_budget_study_varies_any_field_of_the_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "set.json"
    written: list[tuple[int, bool]] = []  # after each run: runs in the file, and complete or not
    study = budget.run

    def run_recording_the_file(*args: Any, on_run: Callable[[dict], None], **kwargs: Any) -> dict:
        def after_run(partial: dict) -> None:
            on_run(partial)
            on_disk = json.loads(out.read_text())
            written.append((len(on_disk["runs"]), on_disk["complete"]))

        return study(*args, on_run=after_run, **kwargs)

    monkeypatch.setattr(budget, "run", run_recording_the_file)
    budget.main(
        [
            "--preset",
            "smoke",
            "--budgets",
            "8:1",
            "--strategies",
            "puma",
            "--seeds",
            "0",
            "--set",
            "preset",
            "--set",
            "dropout=0.3,start_from_vocab_map=false",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    varied_text = "dropout=0.3,start_from_vocab_map=False"
    assert [r["set"] for r in result["summary"]] == ["", varied_text]
    preset_run, varied = result["runs"]
    base = quality.PRESETS["smoke"].budget_migration
    assert preset_run["config"]["dropout"] == base.dropout != 0.3
    assert varied["config"]["dropout"] == 0.3 and varied["config"]["start_from_vocab_map"] is False
    # A study cut short keeps the runs it finished.
    assert written == [(1, False), (2, False)] and result["complete"] is True


@pytest.mark.parametrize(
    "option, bad, message",
    [
        ("--set", "dropout", "write FIELD=VALUE"),
        ("--set", "colour=red", "write FIELD=VALUE"),
        ("--set", "lr=1e-3", "write FIELD=VALUE"),
        ("--set", "hidden=wide", "of type int"),
        ("--set", "start_from_vocab_map=yes", "of type bool"),
        ("--set", "hidden=0", "must be >= 1"),
        ("--selection", "floor_share=2", "floor_share must lie in [0, 1]"),
        ("--selection", "variance_weighting=high", "must be one of"),
        ("--selection", "dropout=0.3", "write FIELD=VALUE"),
    ],
)
def test_budget_study_rejects_a_malformed_variant(
    option: str, bad: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        budget.main(["--preset", "smoke", option, bad, "--out", "unused.json"])
    assert message in capsys.readouterr().err


def test_budget_study_tunes_the_adapter_on_all_users(tmp_path: Path) -> None:
    out = tmp_path / "all.json"
    budget.main(
        [
            "--preset",
            "smoke",
            "--base",
            "migration",
            "--budgets",
            "1:1",
            "--lrs",
            "0.002",
            "--strategies",
            "all",
            "--seeds",
            "0",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert result["base"] == "migration"
    [run] = result["runs"]
    assert run["strategy"] == "all" and run["val_rmse_unselected"] is None
    assert run["lr"] == 0.002 != quality.PRESETS["smoke"].migration.lr
    assert run["example_passes"] > result["n_users"]  # every user's examples, not a budget's
    assert result["summary"][0]["val_rmse_unselected_mean"] is None


def test_budget_study_varies_puma_selection_and_runs_random_once(tmp_path: Path) -> None:
    out = tmp_path / "selection.json"
    budget.main(
        [
            "--preset",
            "smoke",
            "--budgets",
            "8:1",
            "--strategies",
            "puma,random",
            "--seeds",
            "0",
            "--selection",
            "preset",
            "--selection",
            "floor_share=0.0,variance_weighting=uniform",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    varied = "floor_share=0.0,variance_weighting=uniform"
    assert [(r["selection"], r["strategy"]) for r in result["runs"]] == [
        ("", "puma"),
        ("", "random"),
        (varied, "puma"),
    ]
    assert all(0 < r["val_rmse"] < 5 for r in result["runs"])


def test_budget_study_separates_the_adapter_seed_from_the_users(tmp_path: Path) -> None:
    out = tmp_path / "adapter-seeds.json"
    budget.main(
        [
            "--preset",
            "smoke",
            "--budgets",
            "8:1",
            "--strategies",
            "puma",
            "--seeds",
            "0",
            "--adapter-seeds",
            "0,1",
            "--out",
            str(out),
        ]
    )
    runs = json.loads(out.read_text())["runs"]
    assert [(r["seed"], r["adapter_seed"], r["config"]["seed"]) for r in runs] == [
        (0, 0, 0),
        (0, 1, 1),
    ]
    assert runs[0]["val_rmse"] != runs[1]["val_rmse"]  # same users, another adapter
