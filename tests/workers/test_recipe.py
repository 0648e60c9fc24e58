"""A migration without adapter options runs the settings the quality benchmark measured."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import torch

from app.jobs.spec import STORED, MigrationCreate
from bench.quality import PRESETS
from models import recipe
from models.prompts import PromptSet
from workers.adapter_training import recipe_for_request

CPU_SMALL = PRESETS["cpu-small"]
COMMITTED = Path(__file__).parents[2] / "bench" / "results" / "quality-cpu-small.json"


def source_sets(users: int, width: int) -> list[PromptSet]:
    ids = [str(i) for i in range(users)]
    return [PromptSet("smollm2-135m", "rating", ids, torch.zeros(users, 1, width), {})]


def default_request(**selection: Any) -> MigrationCreate:
    """What POST /migrations stores, read back, for a body that names no adapter option."""
    body = MigrationCreate.model_validate(
        {
            "sources": [{"model": "smollm2-135m"}],
            "target": "gemma-3-270m",
            "dataset": "movielens-100k",
            "selection": selection,
        }
    )
    return MigrationCreate.model_validate(body.model_dump(), context=STORED)


def test_a_default_budget_job_runs_the_cpu_small_budget_rows_settings() -> None:
    request = default_request(strategy="puma", budget=CPU_SMALL.budget)
    resolved = recipe_for_request(request, sets=source_sets(943, 576))  # cpu-small's population
    assert resolved.adapter == CPU_SMALL.budget_migration
    assert resolved.selection == CPU_SMALL.selection
    # 0.375 of 390 users spread over 15 clusters
    assert resolved.chosen == {
        "recipe": "budget",
        "input_rank": 64,
        "clusters": 15,
        "floor_per_cluster": 9,
    }


def test_a_default_job_on_every_user_runs_the_cpu_small_all_users_rows_settings() -> None:
    request = default_request(strategy="all")
    resolved = recipe_for_request(request, sets=source_sets(943, 576))
    assert resolved.adapter == CPU_SMALL.migration
    assert resolved.chosen == {"recipe": "all_users", "input_rank": 64}


@pytest.mark.parametrize("kind", ["migration", "budget_migration"])
def test_the_recipe_is_what_the_committed_cpu_small_run_measured(kind: str) -> None:
    committed = json.loads(COMMITTED.read_text())["configs"][kind]
    now = asdict(getattr(CPU_SMALL, kind))
    assert committed == now


def test_a_small_source_set_gets_every_direction_it_has() -> None:
    request = default_request(strategy="puma", budget=8)
    resolved = recipe_for_request(request, sets=source_sets(20, 32))
    assert resolved.adapter.input_rank == 19  # 20 centred prompt vectors span 19 directions
    assert resolved.chosen["clusters"] == 8 and resolved.chosen["floor_per_cluster"] == 1


def test_options_a_request_names_replace_the_recipes_own() -> None:
    request = default_request(strategy="puma", budget=8).model_copy(update={"seed": 3})
    request.adapter = request.adapter.model_copy(
        update={"hidden": 16, "input_rank": 30, "distill_weight": 0.0}
    )
    request.selection = request.selection.model_copy(update={"post_stratify": True})
    resolved = recipe_for_request(request, sets=source_sets(20, 32))
    assert resolved.adapter == replace(
        recipe.BUDGET, hidden=16, input_rank=30, distill_weight=0.0, seed=3
    )
    assert resolved.selection == replace(recipe.SELECTION, post_stratify=True)


def test_a_population_the_recipe_cannot_fit_says_how_to_fix_it() -> None:
    with pytest.raises(ValueError, match=r"budget must lie in 1\.\.20"):
        recipe.Population(users=20, prompt_length=1, features=32, budget=21)
