import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from models.evaluation import Predictions, metrics_of, paired_bootstrap_rmse_diff, within_user_corr
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


def test_within_user_corr_is_the_mean_pearson_of_users_whose_ratings_vary() -> None:
    users = list("aaabbbcc")
    targets = np.array([1.0, 3.0, 5.0, 2.0, 4.0, 5.0, 4.0, 4.0])
    predictions = np.array([2.0, 3.0, 4.5, 3.9, 3.0, 3.6, 1.0, 5.0])
    expected = np.mean(
        [
            np.corrcoef(targets[:3], predictions[:3])[0, 1],
            np.corrcoef(targets[3:6], predictions[3:6])[0, 1],
        ]
    )  # user c's ratings do not vary: skipped
    assert within_user_corr(users, targets, predictions) == pytest.approx(expected)
    # the level of each user carries no within-user correlation, however well it fits RMSE
    levels = np.array([3.0, 3.0, 3.0, 3.7, 3.7, 3.7, 4.0, 4.0])
    assert within_user_corr(users, targets, levels) == 0.0
    assert within_user_corr(list("ab"), np.array([4.0, 2.0]), np.array([1.0, 5.0])) is None


def test_rating_metrics_of_carry_within_user_corr_and_binary_keeps_uauc() -> None:
    users = list("aabb")
    rating = metrics_of(
        get_task("rating"),
        Predictions(users, np.array([1.0, 5.0, 2.0, 4.0]), np.array([2.0, 4.0, 4.0, 2.0])),
    )
    assert rating["within_user_corr"] == pytest.approx(0.0)  # +1 for a, -1 for b
    binary = metrics_of(
        get_task("binary"),
        Predictions(users, np.array([0.0, 1.0, 0.0, 1.0]), np.array([0.1, 0.9, 0.2, 0.8])),
    )
    assert "within_user_corr" not in binary and binary["uauc"] == pytest.approx(1.0)
