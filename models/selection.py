"""Which users train the migration adapter: ``puma`` (grouped), ``random`` or ``all``.

``puma``: K-means on the prompt table (after PCA: raw prompts give one giant cluster), then within
each cluster users are weighted by the quantile bin of their label variance, medium variance
weighted most; a floor of users per cluster first, then the rest of the budget proportional to
cluster size, then a random top-up to exactly the budget. Seeded and deterministic.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from models.errors import BudgetError, DataError

STRATEGIES = ("puma", "random", "all")
BIN_WEIGHTS = np.array([0.079, 0.237, 0.369, 0.237, 0.079])  # a normal curve over 5 quantiles


def label_variance(labels: dict[str, list[float]], user_ids: list[str]) -> np.ndarray:
    """Sample variance of each user's training labels (0 with fewer than two)."""
    return np.array([np.var(labels.get(u, []), ddof=1) if len(labels.get(u, [])) > 1 else 0.0
                     for u in user_ids])  # fmt: skip


def cluster_users(prompts: torch.Tensor, *, n_clusters: int, seed: int) -> np.ndarray:
    """Cluster id per user, from k-means++ on a PCA of the flattened prompts."""
    features = prompts.reshape(len(prompts), -1).double().numpy()
    dims = min(16, features.shape[0] - 1, features.shape[1])
    if dims >= 1:
        features = PCA(n_components=dims, random_state=seed).fit_transform(features)
    k = min(n_clusters, len(features))
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(features)


def _variance_weights(variance: np.ndarray) -> np.ndarray:
    """Weight by quantile bin of variance within the group; ranks make ties split evenly."""
    ranks = np.argsort(np.argsort(variance, kind="stable"), kind="stable")
    bins = ranks * len(BIN_WEIGHTS) // max(len(variance), 1)
    return BIN_WEIGHTS[bins]


def _weighted_take(
    rng: np.random.Generator, pool: np.ndarray, weights: np.ndarray, k: int
) -> np.ndarray:
    k = min(k, len(pool))
    if k <= 0:
        return pool[:0]
    return rng.choice(pool, size=k, replace=False, p=weights / weights.sum())


def puma_select(
    *, clusters: np.ndarray, variance: np.ndarray, budget: int, seed: int, floor: int = 50
) -> np.ndarray:
    """Row indices of exactly ``budget`` users."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(clusters == c) for c in np.unique(clusters)]
    weights = np.zeros(len(variance))
    for rows in groups:
        weights[rows] = _variance_weights(variance[rows])
    per_group_floor = min(floor, budget // len(groups))
    chosen = np.zeros(len(variance), dtype=bool)
    for rows in groups:
        chosen[_weighted_take(rng, rows, weights[rows], per_group_floor)] = True
    remaining = budget - int(chosen.sum())
    for rows in groups:
        free = rows[~chosen[rows]]
        quota = int(remaining * len(rows) / len(variance))
        chosen[_weighted_take(rng, free, weights[free], quota)] = True
    short = budget - int(chosen.sum())
    if short > 0:
        chosen[rng.choice(np.flatnonzero(~chosen), size=short, replace=False)] = True
    return np.flatnonzero(chosen)


def select_users(
    strategy: str,
    *,
    prompts: torch.Tensor,
    labels: dict[str, list[float]] | None,
    user_ids: list[str],
    budget: int | None,
    seed: int = 0,
    n_clusters: int = 15,
) -> list[str]:
    """Users to train the adapter on, in the order of ``user_ids``."""
    if strategy not in STRATEGIES:
        raise DataError(f"Unknown selection strategy {strategy!r}: use one of {STRATEGIES}.")
    if not user_ids:
        raise DataError("No users to select from: the source prompt set is empty.")
    if strategy == "all":
        return list(user_ids)
    if budget is None or not 1 <= budget <= len(user_ids):
        raise BudgetError(
            f"Budget {budget} is outside 1..{len(user_ids)} (the users with prompts): lower it or "
            "use strategy 'all'."
        )
    if strategy == "random":
        rows = np.sort(np.random.default_rng(seed).choice(len(user_ids), budget, replace=False))
    else:
        clusters = cluster_users(prompts, n_clusters=n_clusters, seed=seed)
        rows = puma_select(clusters=clusters, variance=label_variance(labels or {}, user_ids),
                           budget=budget, seed=seed)  # fmt: skip
    return [user_ids[i] for i in rows]
