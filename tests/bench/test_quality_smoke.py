"""The smoke preset of the quality benchmark runs end to end and writes the documented JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import quality

METHODS = {
    "global_mean",
    "user_mean",
    "source",
    "instant",
    "random_init",
    "retrain",
    "puma_all",
    "puma_budget",
    "random_budget",
    "bias_model",
}
FIELDS = {
    "method",
    "rmse",
    "mae",
    "auc",
    "uauc",
    "within_user_corr",
    "rmse_ci95_vs_retrain",
    "train_seconds",
    "example_passes",
    "users_trained",
}


def test_smoke_preset_writes_every_row_with_intervals_and_a_chart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "smoke.json"
    quality.main(["--preset", "smoke", "--out", str(out)])
    logged = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert {
        "preset",
        "dataset",
        "task",
        "source_model",
        "target_model",
        "n_users",
        "budget_users",
        "rows",
    } <= result.keys()
    smoke = quality.PRESETS["smoke"]
    assert result["configs"]["budget_migration"]["epochs"] == smoke.budget_migration.epochs
    assert result["configs"]["prompt"]["lr"] == smoke.prompt.lr
    rows = {row["method"]: row for row in result["rows"]}
    assert set(rows) == METHODS
    for row in rows.values():
        assert row.keys() >= FIELDS
        low, high = row["rmse_ci95_vs_retrain"]
        assert low <= high
        assert row["rmse"] > 0
        assert row["within_user_corr"] is None or -1 <= row["within_user_corr"] <= 1
    # a constant prediction orders no user's items
    assert rows["global_mean"]["within_user_corr"] == 0.0
    assert rows["bias_model"]["example_passes"] == 0
    assert rows["bias_model"]["item_shrink"] in quality.SHRINKAGE_GRID
    assert rows["retrain"]["rmse_ci95_vs_retrain"] == [0.0, 0.0]
    # every trained row's interval is in the log as soon as both it and retraining are measured
    for method in METHODS - {"global_mean", "user_mean", "retrain"}:
        low, high = rows[method]["rmse_ci95_vs_retrain"]
        assert f"{method}: RMSE - retrain, 95% CI [{low:+.3f}, {high:+.3f}]" in logged
    instant = rows["instant"]
    assert instant["example_passes"] == 0 and instant["train_seconds"] == 0
    assert instant["fit_seconds"] > 0 and instant["inference_passes"] > 0
    assert rows["puma_budget"]["users_trained"] == result["budget_users"]
    assert rows["puma_all"]["users_trained"] == result["n_users"]
    # the budget rows pool their selection seeds: the pooled RMSE lies within the seeds' spread
    for method in ("puma_budget", "random_budget"):
        per_seed = rows[method]["rmse_per_seed"]
        assert rows[method]["seeds"] == len(result["budget_seeds"]) == len(per_seed) > 1
        assert min(per_seed) - 1e-6 <= rows[method]["rmse"] <= max(per_seed) + 1e-6
    # few users cost few passes: the point of the budget
    assert rows["puma_budget"]["example_passes"] < rows["puma_all"]["example_passes"]
    assert (tmp_path / "smoke.png").stat().st_size > 1000


def test_a_rehearsal_keeps_the_recipe_on_fewer_users_and_never_passes_for_the_preset() -> None:
    full = quality.PRESETS["gpu-full"]
    assert quality.rehearsal(full, max_users=None, device=None) is full
    small = quality.rehearsal(full, max_users=24, device="cpu")
    assert small.name == "gpu-full-rehearsal"
    assert (small.max_users, small.budget, small.device) == (24, 6, "cpu")
    assert small.prompt == full.prompt and small.budget_migration == full.budget_migration
    with pytest.raises(ValueError, match="at least 8 users"):
        quality.rehearsal(full, max_users=3, device=None)
