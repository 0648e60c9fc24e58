"""The measured recipe: the adapter and selection settings of the quality benchmark's adapter rows,
and what a migration job runs unless its request names other values.

``MigrationConfig`` and ``SelectionConfig`` default to the paper's reference method; this module
is the one place that says how the service and the benchmark depart from it. The evidence for
every choice is in bench/README.md. Two parts depend on the population, each by a stated rule:

- the adapter reads the source table's top ``RANK`` principal directions, or as many as the table
  has (``fitted_rank``: fewer than its prompt vectors, at most its features);
- puma's floors take ``SELECTION.floor_share`` of the budget, split over the clusters, at most the
  reference's 50 and at least one user each (``cluster_floor``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from models.migration import MigrationConfig, fitted_rank
from models.selection import SelectionConfig, cluster_count, cluster_floor

RANK = 64  # principal directions of the source table the adapter reads

# The adapter on all users: a small network on a few input directions, started at zero, with a
# slow head; one epoch, since validation peaked at the first whenever it was given more.
ALL_USERS = MigrationConfig(hidden=64, epochs=1, lr=5e-4, head_lr=1e-3, input_rank=RANK)

# On a budget, LM passes are the cost: more users on their latest few ratings, targets mostly the
# source set's own prediction (its passes fit the budget), a cheaper head warm-up.
BUDGET = replace(
    ALL_USERS, batch_size=16, head_warmup_examples=1024, max_train_per_user=7, distill_weight=0.8
)

# Floors at the reference's share of its budget (750 of 2000), no weighting by label variance.
SELECTION = SelectionConfig(floor_share=0.375, variance_weighting="uniform")


@dataclass(frozen=True)
class Population:
    """What the recipe adapts to: the source table the adapter maps and the users it trains on."""

    users: int  # users in every source set: the table of the input statistics
    prompt_length: int
    features: int  # the sources' widths, summed
    budget: int | None  # users the adapter trains on; None: every user

    def __post_init__(self) -> None:
        for name in ("users", "prompt_length", "features"):
            if getattr(self, name) < 1:
                raise ValueError(f"Population.{name} must be >= 1, got {getattr(self, name)}.")
        if self.budget is not None and not 1 <= self.budget <= self.users:
            raise ValueError(
                f"Population.budget must lie in 1..{self.users} (the users), or be "
                f"None for every user; got {self.budget}."
            )


@dataclass(frozen=True)
class Resolved:
    """The settings one migration runs, and what the population-dependent rules chose."""

    adapter: MigrationConfig
    selection: SelectionConfig
    chosen: dict[str, Any]

    def record(self) -> dict[str, Any]:
        """For the job's record: every setting, and the rules' choices beside them."""
        return {
            "adapter": asdict(self.adapter),
            "selection": asdict(self.selection),
            "chosen": dict(self.chosen),
        }


def resolve(
    population: Population,
    *,
    adapter: Mapping[str, Any] | None = None,
    selection: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> Resolved:
    """The recipe for ``population``, with the fields ``adapter`` and ``selection`` name (a
    value of None keeps the recipe's)."""
    adapter_changes = {k: v for k, v in (adapter or {}).items() if v is not None}
    base = ALL_USERS if population.budget is None else BUDGET
    config = replace(base, seed=seed, **adapter_changes)
    rank = config.input_rank
    if rank is not None and "input_rank" not in adapter_changes:
        rank = fitted_rank(
            rank,
            prompt_vectors=population.users * population.prompt_length,
            features=population.features,
        )
        config = replace(config, input_rank=rank)
    picking = replace(SELECTION, **{k: v for k, v in (selection or {}).items() if v is not None})
    chosen: dict[str, Any] = {"input_rank": config.input_rank, "recipe": "all_users"}
    if population.budget is not None:
        clusters = cluster_count(picking, budget=population.budget, users=population.users)
        floor = cluster_floor(picking, budget=population.budget, clusters=clusters)
        chosen |= {"recipe": "budget", "clusters": clusters, "floor_per_cluster": floor}
    return Resolved(adapter=config, selection=picking, chosen=chosen)
