"""The quality gate compares the migrated set with the best source on the primary metric."""

from __future__ import annotations

from models.tasks import get_task
from workers.finalize import quality_gate


def test_lower_is_better_within_and_beyond_tolerance() -> None:
    rating = get_task("rating")
    sources = {"a@1": {"rmse": 1.00}, "b@1": {"rmse": 0.90}}
    ok = quality_gate(task=rating, migrated={"rmse": 0.94}, sources=sources, tolerance=0.05)
    assert ok["passed"] and ok["best_source"] == 0.90
    bad = quality_gate(task=rating, migrated={"rmse": 0.96}, sources=sources, tolerance=0.05)
    assert not bad["passed"] and abs(bad["worse_by"] - 0.06) < 1e-9


def test_higher_is_better() -> None:
    binary = get_task("binary")
    sources = {"a@1": {"auc": 0.70}}
    assert quality_gate(task=binary, migrated={"auc": 0.69}, sources=sources, tolerance=0.02)[
        "passed"
    ]
    assert not quality_gate(task=binary, migrated={"auc": 0.60}, sources=sources, tolerance=0.02)[
        "passed"
    ]


def test_uncomputable_metric_is_not_gated() -> None:
    binary = get_task("binary")
    gate = quality_gate(task=binary, migrated={"auc": None}, sources={}, tolerance=0.0)
    assert gate["passed"] and "not gated" in gate["reason"]
