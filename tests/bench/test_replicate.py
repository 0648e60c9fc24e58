"""The budget replicate runs on the smoke preset and scores both held-out splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import quality, replicate


def test_replicate_scores_each_selection_on_validation_and_test(tmp_path: Path) -> None:
    out = tmp_path / "replicate.json"
    replicate.main(["--preset", "smoke", "--seed", "0", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [r["selection"] for r in result["rows"]] == ["puma, preset", "puma, reference", "random"]
    splits = quality.preset_splits(quality.PRESETS["smoke"])
    for part, interactions in (("validation", splits.val), ("test", splits.test)):
        labels = [i.label for items in interactions.values() for i in items]
        for row in result["rows"]:
            summary = row[part]
            assert summary["mean_target"] == pytest.approx(np.mean(labels), rel=1e-5)
            assert summary["bias"] == pytest.approx(
                summary["mean_prediction"] - summary["mean_target"], abs=1e-4
            )
            assert summary["rmse_without_bias"] <= summary["rmse"] + 1e-6
            assert summary["rmse"] ** 2 == pytest.approx(
                summary["rmse_without_bias"] ** 2 + summary["bias"] ** 2, rel=1e-4
            )
