import numpy as np
import pytest
import torch

from models.errors import BudgetError, DataError
from models.selection import SelectionConfig, cluster_users, select_users


def population(
    n: int = 300, seed: int = 0
) -> tuple[torch.Tensor, dict[str, list[float]], list[str]]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, 16)) * 3
    prompts = torch.tensor(centres[rng.integers(0, 6, n)] + rng.normal(size=(n, 16)))
    users = [f"u{i}" for i in range(n)]
    labels = {u: rng.integers(1, 6, size=rng.integers(1, 12)).astype(float).tolist() for u in users}
    return prompts.unsqueeze(1).float(), labels, users


@pytest.mark.parametrize("budget", [1, 7, 15, 40, 299, 300])
@pytest.mark.parametrize("strategy", ["puma", "random"])
def test_exact_budget_of_distinct_users(strategy: str, budget: int) -> None:
    prompts, labels, users = population()
    chosen = select_users(
        strategy, prompts=prompts, labels=labels, user_ids=users, budget=budget
    ).users
    assert len(chosen) == budget == len(set(chosen))
    assert set(chosen) <= set(users)


def test_budget_below_the_cluster_floors_is_still_exact() -> None:
    prompts, labels, users = population(n=40)
    chosen = select_users(
        "puma",
        prompts=prompts,
        labels=labels,
        user_ids=users,
        budget=3,
        config=SelectionConfig(n_clusters=15),
    ).users
    assert len(chosen) == 3


def test_a_budget_smaller_than_k_still_spreads_over_the_groups() -> None:
    # Three well-separated groups, one holding most users: at a budget of 3 with K = 15, each
    # group must give one user, where a random draw of 3 mostly stays in the large group.
    rng = np.random.default_rng(1)
    centres = np.eye(3, 16) * 50
    prompts = torch.tensor(np.repeat(centres, [40, 4, 4], axis=0) + rng.normal(size=(48, 16)))
    users = [f"u{i}" for i in range(48)]
    labels = {u: [1.0, 3.0, 5.0] for u in users}
    group = {u: 0 if i < 40 else 1 if i < 44 else 2 for i, u in enumerate(users)}
    for seed in range(5):
        chosen = select_users(
            "puma",
            prompts=prompts.unsqueeze(1).float(),
            labels=labels,
            user_ids=users,
            budget=3,
            seed=seed,
        ).users
        assert sorted(group[u] for u in chosen) == [0, 1, 2]


def test_every_cluster_is_represented() -> None:
    prompts, labels, users = population()
    clusters = cluster_users(prompts, n_clusters=15, seed=0)
    chosen = select_users("puma", prompts=prompts, labels=labels, user_ids=users, budget=30).users
    rows = [users.index(u) for u in chosen]
    assert set(clusters[rows]) == set(clusters)


def test_same_seed_same_users_and_other_seed_other_users() -> None:
    prompts, labels, users = population()

    def pick(seed: int) -> list[str]:
        chosen = select_users(
            "puma", prompts=prompts, labels=labels, user_ids=users, budget=50, seed=seed
        )
        return list(chosen.users)

    assert pick(3) == pick(3)
    assert pick(3) != pick(4)


def test_medium_variance_users_are_favoured() -> None:
    prompts, labels, users = population(n=600)
    variance = {u: np.var(v, ddof=1) if len(v) > 1 else 0.0 for u, v in labels.items()}
    ranks = {u: r for r, u in enumerate(sorted(users, key=variance.__getitem__))}
    chosen = select_users("puma", prompts=prompts, labels=labels, user_ids=users, budget=200).users
    middle = sum(1 for u in chosen if 0.2 <= ranks[u] / len(users) < 0.8)
    assert middle / len(chosen) > 0.7  # uniform sampling would give 0.6


def test_all_returns_everyone() -> None:
    prompts, labels, users = population(n=20)
    assert (
        select_users("all", prompts=prompts, labels=labels, user_ids=users, budget=None).users
        == users
    )


@pytest.mark.parametrize("budget", [0, 301, None])
def test_budget_outside_the_population_is_refused(budget: int | None) -> None:
    prompts, labels, users = population()
    with pytest.raises(BudgetError, match=r"outside 1\.\.300"):
        select_users("puma", prompts=prompts, labels=labels, user_ids=users, budget=budget)


def test_unknown_strategy_is_refused() -> None:
    prompts, labels, users = population(n=10)
    with pytest.raises(DataError, match="strategy"):
        select_users("best", prompts=prompts, labels=labels, user_ids=users, budget=2)


def cluster_shares(floor_share: float) -> tuple[np.ndarray, np.ndarray]:
    """Each cluster's share of a population of uneven clusters, and of a budget of 60 from it."""
    prompts, labels, users = population(n=600)
    clusters = cluster_users(prompts, n_clusters=15, seed=0)
    chosen = select_users(
        "puma",
        prompts=prompts,
        labels=labels,
        user_ids=users,
        budget=60,
        config=SelectionConfig(floor_share=floor_share),
    ).users
    picked = clusters[[users.index(u) for u in chosen]]
    ids = np.unique(clusters)
    population_share = np.array([np.mean(clusters == c) for c in ids])
    return population_share, np.array([np.mean(picked == c) for c in ids])


def test_full_floors_spread_a_small_budget_evenly_and_a_small_share_follows_cluster_size() -> None:
    population_share, even = cluster_shares(1.0)
    _, proportional = cluster_shares(0.0)
    assert np.ptp(even) <= 1 / 60 < np.ptp(population_share)
    assert np.abs(proportional - population_share).sum() < np.abs(even - population_share).sum()
    assert (proportional > 0).all()  # one user per cluster, whatever the share


def test_uniform_variance_weighting_does_not_favour_medium_variance() -> None:
    prompts, labels, users = population(n=600)
    variance = {u: np.var(v, ddof=1) if len(v) > 1 else 0.0 for u, v in labels.items()}
    ranks = {u: r for r, u in enumerate(sorted(users, key=variance.__getitem__))}
    chosen = select_users(
        "puma",
        prompts=prompts,
        labels=labels,
        user_ids=users,
        budget=200,
        config=SelectionConfig(variance_weighting="uniform"),
    ).users
    middle = sum(1 for u in chosen if 0.2 <= ranks[u] / len(users) < 0.8)
    assert middle / len(chosen) < 0.7


@pytest.mark.parametrize(
    "fields", [{"floor_share": 1.5}, {"variance_weighting": "high"}, {"n_clusters": 0}]
)
def test_a_bad_selection_config_says_which_field(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(fields))):
        SelectionConfig(**fields)  # type: ignore[arg-type]


def test_post_stratified_weights_give_each_cluster_its_population_share() -> None:
    prompts, labels, users = population(n=600)
    clusters = dict(zip(users, cluster_users(prompts, n_clusters=15, seed=0), strict=True))
    chosen = select_users(
        "puma",
        prompts=prompts,
        labels=labels,
        user_ids=users,
        budget=60,
        config=SelectionConfig(post_stratify=True),
    )
    weights = np.array([chosen.weights[u] for u in chosen.users])
    assert np.isclose(weights.mean(), 1.0) and np.ptp(weights) > 0.5  # the floors are uneven
    for cluster in set(clusters.values()):
        members = [u for u in chosen.users if clusters[u] == cluster]
        weighted_share = sum(chosen.weights[u] for u in members) / len(chosen.users)
        population_share = sum(1 for c in clusters.values() if c == cluster) / len(users)
        assert np.isclose(weighted_share, population_share)


@pytest.mark.parametrize("strategy", ["random", "puma"])
def test_weights_are_one_without_post_stratification(strategy: str) -> None:
    prompts, labels, users = population()
    chosen = select_users(
        strategy,
        prompts=prompts,
        labels=labels,
        user_ids=users,
        budget=40,
        config=SelectionConfig(post_stratify=False),
    )
    assert list(chosen.weights) == chosen.users
    assert set(chosen.weights.values()) == {1.0}


def test_random_users_all_weigh_one() -> None:
    prompts, labels, users = population()
    chosen = select_users("random", prompts=prompts, labels=labels, user_ids=users, budget=40)
    assert set(chosen.weights.values()) == {1.0}
