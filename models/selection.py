"""Which users train the migration adapter: ``puma`` (grouped), ``random`` or ``all``.

``puma``: K-means on the prompt table (after PCA: raw prompts give one giant cluster), then within
each cluster users are weighted by the quantile bin of their label variance, medium variance
weighted most; a floor of users per cluster first, then the rest of the budget proportional to
cluster size, then a random top-up to exactly the budget. A budget smaller than K clusters into
as many groups as it has users, so it still takes one user from each group rather than a random
draw. Seeded and deterministic.

Floors give a small group as many users as a large one, so a small budget over-represents small
groups. ``post_stratify`` gives the adapter's loss weights that undo this: each selected user
weighs its cluster's share of the population over its share of the selection, so every group
counts as much as it has users, while the users who stand for it were still chosen the
reference's way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from models.errors import BudgetError, DataError

STRATEGIES = ("puma", "random", "all")
BIN_WEIGHTS = {
    "normal": np.array([0.079, 0.237, 0.369, 0.237, 0.079]),  # a normal curve over 5 quantiles
    "uniform": np.full(5, 0.2),
}


@dataclass(frozen=True)
class SelectionConfig:
    """How ``puma`` spends a budget (``random`` and ``all`` ignore it)."""

    n_clusters: int = 15  # the reference's K
    floor: int = 50  # users first taken from every cluster, so that small groups are represented
    # Share of the budget the floors may take when it cannot pay every cluster's full floor. The
    # reference's 2000 users spend 750 (15 x 50) on floors and the rest in proportion to cluster
    # size; 1.0 lets floors take a whole small budget: as many users from every cluster. Every
    # cluster still gets one user whenever the budget has one per cluster.
    floor_share: float = 1.0
    # Medium-variance users weighted most ("normal", the reference) or not at all ("uniform").
    variance_weighting: Literal["normal", "uniform"] = "normal"
    # Weigh each selected user's examples by its cluster's population share over its selection
    # share, so the training objective weighs groups as the population does. Off, the reference's
    # loss: it has not been measured to help on test (bench/README.md, "Post-stratified").
    post_stratify: bool = False

    def __post_init__(self) -> None:
        if self.n_clusters < 1 or self.floor < 0:
            raise ValueError("SelectionConfig needs n_clusters >= 1 and floor >= 0.")
        if not 0.0 <= self.floor_share <= 1.0:
            raise ValueError(
                f"SelectionConfig.floor_share must lie in [0, 1], got {self.floor_share}."
            )
        if self.variance_weighting not in BIN_WEIGHTS:
            raise ValueError(
                f"SelectionConfig.variance_weighting must be one of "
                f"{sorted(BIN_WEIGHTS)}, got {self.variance_weighting!r}."
            )


@dataclass(frozen=True)
class Selection:
    """The users who train the adapter, in order, each with the weight of its examples in the
    adapter's loss (mean 1; all 1 unless puma post-stratifies)."""

    weights: dict[str, float]

    @classmethod
    def unweighted(cls, users: list[str]) -> Selection:
        return cls(dict.fromkeys(users, 1.0))

    @property
    def users(self) -> list[str]:
        return list(self.weights)


def stratum_weights(clusters: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per selected row: its cluster's share of everyone over its share of ``rows`` (mean 1)."""
    population = np.bincount(clusters, minlength=clusters.max() + 1) / len(clusters)
    selected = np.bincount(clusters[rows], minlength=clusters.max() + 1) / len(rows)
    return population[clusters[rows]] / selected[clusters[rows]]


def label_variance(labels: dict[str, list[float]], user_ids: list[str]) -> np.ndarray:
    """Sample variance of each user's training labels (0 with fewer than two)."""
    return np.array(
        [np.var(labels.get(u, []), ddof=1) if len(labels.get(u, [])) > 1 else 0.0 for u in user_ids]
    )


def cluster_users(prompts: torch.Tensor, *, n_clusters: int, seed: int) -> np.ndarray:
    """Cluster id per user, from k-means++ on a PCA of the flattened prompts."""
    features = prompts.reshape(len(prompts), -1).double().numpy()
    dims = min(16, features.shape[0] - 1, features.shape[1])
    if dims >= 1:
        features = PCA(n_components=dims, random_state=seed).fit_transform(features)
    k = min(n_clusters, len(features))
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(features)


def _variance_weights(variance: np.ndarray, bin_weights: np.ndarray) -> np.ndarray:
    """Weight by quantile bin of variance within the group; ranks make ties split evenly."""
    ranks = np.argsort(np.argsort(variance, kind="stable"), kind="stable")
    bins = ranks * len(bin_weights) // max(len(variance), 1)
    return bin_weights[bins]


def cluster_count(config: SelectionConfig, *, budget: int, users: int) -> int:
    """Clusters puma forms: more groups than users would leave groups unpaid."""
    return min(config.n_clusters, budget, users)


def cluster_floor(config: SelectionConfig, *, budget: int, clusters: int) -> int:
    """Users first taken from each cluster: ``floor_share`` of the budget split over the
    clusters, at most ``floor``, and one user per cluster whenever the budget has one for each."""
    floors_budget = max(clusters, round(config.floor_share * budget))
    return min(config.floor, floors_budget // clusters, budget // clusters)


def _weighted_take(
    rng: np.random.Generator, pool: np.ndarray, weights: np.ndarray, k: int
) -> np.ndarray:
    k = min(k, len(pool))
    if k <= 0:
        return pool[:0]
    return rng.choice(pool, size=k, replace=False, p=weights / weights.sum())


def puma_select(
    *,
    clusters: np.ndarray,
    variance: np.ndarray,
    budget: int,
    seed: int,
    config: SelectionConfig = SelectionConfig(),
) -> np.ndarray:
    """Row indices of exactly ``budget`` users."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(clusters == c) for c in np.unique(clusters)]
    weights = np.zeros(len(variance))
    for rows in groups:
        weights[rows] = _variance_weights(variance[rows], BIN_WEIGHTS[config.variance_weighting])
    per_group_floor = cluster_floor(config, budget=budget, clusters=len(groups))
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
    config: SelectionConfig = SelectionConfig(),
) -> Selection:
    """Users to train the adapter on, in the order of ``user_ids``, with their loss weights."""
    if strategy not in STRATEGIES:
        raise DataError(f"Unknown selection strategy {strategy!r}: use one of {STRATEGIES}.")
    if not user_ids:
        raise DataError("No users to select from: the source prompt set is empty.")
    if strategy == "all":
        return Selection.unweighted(user_ids)
    if budget is None or not 1 <= budget <= len(user_ids):
        raise BudgetError(
            f"Budget {budget} is outside 1..{len(user_ids)} (the users with prompts): lower it or "
            "use strategy 'all'."
        )
    if strategy == "random":
        rows = np.sort(np.random.default_rng(seed).choice(len(user_ids), budget, replace=False))
        return Selection.unweighted([user_ids[i] for i in rows])
    k = cluster_count(config, budget=budget, users=len(user_ids))
    clusters = cluster_users(prompts, n_clusters=k, seed=seed)
    rows = puma_select(
        clusters=clusters,
        variance=label_variance(labels or {}, user_ids),
        budget=budget,
        seed=seed,
        config=config,
    )
    users = [user_ids[i] for i in rows]
    if not config.post_stratify:
        return Selection.unweighted(users)
    weights = stratum_weights(clusters, rows)
    return Selection({u: float(w) for u, w in zip(users, weights, strict=True)})
