import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from models.evaluation import paired_bootstrap_rmse_diff
from models.tasks import get_task


def test_rating_metrics_are_global_not_per_batch() -> None:
    targets = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 5.0])
    predictions = np.array([1.5, 2.0, 2.0, 4.0, 3.0, 5.0])
    metrics = get_task("rating").metrics(
        user_ids=list("aabbcc"), targets=targets, predictions=predictions
    )
    assert metrics["rmse"] == pytest.approx(np.sqrt(np.mean((targets - predictions) ** 2)))
    assert metrics["mae"] == pytest.approx(np.mean(np.abs(targets - predictions)))


def test_binary_metrics_match_sklearn_and_per_user_mean() -> None:
    users = ["a", "a", "a", "b", "b", "b", "c", "c"]
    targets = np.array([1, 0, 1, 0, 1, 0, 1, 1], dtype=float)
    scores = np.array([0.9, 0.2, 0.4, 0.6, 0.5, 0.1, 0.3, 0.8])
    metrics = get_task("binary").metrics(user_ids=users, targets=targets, predictions=scores)
    assert metrics["auc"] == pytest.approx(roc_auc_score(targets, scores))
    per_user = [roc_auc_score(targets[:3], scores[:3]), roc_auc_score(targets[3:6], scores[3:6])]
    assert metrics["uauc"] == pytest.approx(np.mean(per_user))  # user c has one class: skipped


def test_bootstrap_interval_brackets_a_real_difference() -> None:
    rng = np.random.default_rng(0)
    users = [f"u{i // 5}" for i in range(2000)]
    targets = rng.integers(1, 6, 2000).astype(float)
    good = targets + rng.normal(0, 0.8, 2000)
    bad = targets + rng.normal(0, 1.2, 2000)
    low, high = paired_bootstrap_rmse_diff(user_ids=users, targets=targets, pred=bad, baseline=good)
    true = np.sqrt(np.mean((bad - targets) ** 2)) - np.sqrt(np.mean((good - targets) ** 2))
    assert 0 < low < true < high
    same = paired_bootstrap_rmse_diff(user_ids=users, targets=targets, pred=good, baseline=good)
    assert same == (0.0, 0.0)
