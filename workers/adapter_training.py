"""A migration's training stage: the recipe for its population, the users, and the adapter (or the
instant map), each stored once so that a re-delivered stage does not train again."""

from __future__ import annotations

import json
import time
from typing import Any

from prompt_migration_client.jobs import Stage
from safetensors.torch import save as save_tensors

from app.jobs.spec import MigrationCreate
from models import recipe
from models.adapter.model import adapter_to_bytes
from models.data import Splits
from models.errors import DataError
from models.foundation import FoundationModel
from models.instant import fit_instant, fit_vocab_map
from models.migration import MigrationConfig, stack_sources, train_adapter
from models.prompts import PromptSet
from models.selection import Selection, SelectionConfig, select_users
from models.tasks import Task
from workers.context import JobRun, load_model


def job_recipe(job: JobRun, *, sets: list[PromptSet]) -> recipe.Resolved:
    """The measured recipe fitted to this job's population (``sets``: the sample of it that
    gives the input statistics), with what its request names; the job's record shows every
    setting and what the population-dependent rules chose."""
    resolved = recipe_for_request(job.migration, sets=sets)
    job.update(recipe=resolved.record())
    return resolved


def recipe_for_request(request: MigrationCreate, *, sets: list[PromptSet]) -> recipe.Resolved:
    """``request``'s adapter and selection options over the recipe, for the users of ``sets``."""
    selection = request.selection
    population = recipe.Population(
        users=len(sets[0].user_ids),
        prompt_length=sets[0].prompt_length,
        features=sum(s.width for s in sets),
        budget=None if selection.strategy == "all" else selection.budget,
    )
    return recipe.resolve(
        population,
        adapter=request.adapter.model_dump(),
        selection={"post_stratify": selection.post_stratify},
        seed=request.seed,
    )


def select(
    job: JobRun, *, sets: list[PromptSet], splits: Splits, config: SelectionConfig
) -> Selection:
    """The users who train the adapter and their loss weights, stored once: a redelivered
    stage trains on the same users."""
    stored = job.store.get_blob(job.id, "selected")
    if stored is not None:
        return Selection(json.loads(stored))  # user -> loss weight, in selection order
    job.update(stage=Stage.selecting)
    trainable = [u for u in sets[0].user_ids if u in splits.train]
    selection = job.migration.selection
    chosen = select_users(
        selection.strategy,
        prompts=stack_sources(sets, trainable),
        labels=splits.train_labels(),
        user_ids=trainable,
        budget=selection.budget,
        seed=job.migration.seed,
        config=config,
    )
    job.store.put_blob(job.id, "selected", json.dumps(chosen.weights).encode())
    return chosen


def _vocab_maps(sources: list[dict[str, str]], target: FoundationModel) -> list[Any] | None:

    try:
        return [fit_vocab_map(load_model(s["model"]), target) for s in sources]
    except DataError:
        return None  # too few shared tokens: the adapter starts from scratch


def fit_map(
    job: JobRun, *, sources: list[dict[str, str]], sets: list[PromptSet], task: Task, splits: Splits
) -> None:
    """The data-free map, stored as the job's adapter, and the head refitted to read the target:
    no ratings and no training (models.instant.fit_instant)."""
    target_name, _ = job.target
    job.update(stage=Stage.fitting, users_selected=0)
    started = time.perf_counter()
    fitted = fit_instant(
        task,
        sources=sets,
        source_models=[load_model(s["model"]) for s in sources],
        target=load_model(target_name),
        item_texts=splits.train_item_texts(),
        seed=job.migration.seed,
    )
    job.store.put_blob(job.id, "head", save_tensors(fitted.head.state))
    job.update(
        cost={
            "train_seconds": 0.0,
            "example_passes": 0,
            "users_trained": 0,
            "fit_seconds": round(time.perf_counter() - started, 3),
            "inference_passes": fitted.head.passes,
        },
    )
    job.store.put_blob(job.id, "adapter", adapter_to_bytes(fitted.linear.as_adapter()))


def train(
    job: JobRun,
    *,
    sources: list[dict[str, str]],
    sets: list[PromptSet],
    task: Task,
    statistics: list[PromptSet],
    splits: Splits,
    selected: Selection,
    config: MigrationConfig,
) -> None:
    """Train on the ``selected`` users of ``sets``; ``statistics`` hold the sample of the
    population that gives the adapter's input statistics."""
    target_name, _ = job.target
    job.update(stage=Stage.training, users_selected=len(selected.users))
    job.store.count(job.id, "adapter_trainings")
    target = load_model(target_name)
    result = train_adapter(
        sources=sets,
        target=target,
        task=task,
        splits=splits.restrict(selected.users),
        users=selected.users,
        user_weights=selected.weights,
        statistics=statistics,
        config=config,
        vocab_maps=_vocab_maps(sources, target) if config.start_from_vocab_map else None,
        source_model=load_model(sources[0]["model"]) if config.distill_weight else None,
        on_progress=job.progress(0.0, 0.5),
        should_stop=job.should_stop,
    )
    job.store.put_blob(job.id, "head", save_tensors(result.head))
    job.update(
        cost={
            "train_seconds": round(result.seconds, 3),
            "example_passes": result.example_passes,
            "users_trained": result.users_trained,
        },
        history=result.history[-20:],
    )
    # Last: its presence tells a re-delivered stage that training is done.
    job.store.put_blob(job.id, "adapter", adapter_to_bytes(result.adapter))
