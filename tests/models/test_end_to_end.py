"""Tiny models, a learnable per-user signal: training and migration must beat random prompts."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from models.data import Splits
from models.evaluation import evaluate
from models.foundation import FoundationModel
from models.instant import fit_vocab_map, instant_migrate
from models.migration import MigrationConfig, migrate_all, stack_sources, train_adapter
from models.prompts import PromptSet
from models.selection import select_users
from models.tasks import Task
from models.training import random_prompts

# Few users make few optimizer steps: small batches and a quick head keep the test short.
ADAPTER_CONFIG = MigrationConfig(
    hidden=32, epochs=12, lr=3e-3, head_lr=1e-2, batch_size=8, patience=12, head_warmup_epochs=1
)


def rmse(model: FoundationModel, task: Task, prompts: PromptSet, splits: Splits) -> float:
    value = evaluate(model, task, prompts, splits.test)["rmse"]
    assert value is not None
    return value


def randomised(prompt_set: PromptSet, model: FoundationModel) -> PromptSet:
    """The same users and head with random real-token prompts of ``model``."""
    n, length = len(prompt_set.user_ids), prompt_set.prompt_length
    prompts = random_prompts(model, n_users=n, prompt_length=length, seed=99)
    return PromptSet(model.name, prompt_set.task, prompt_set.user_ids, prompts, prompt_set.head)


def test_trained_prompts_beat_random_prompts(
    tiny_llama: FoundationModel, rating: Task, tiny_splits: Splits, source_set: PromptSet
) -> None:
    trained = rmse(tiny_llama, rating, source_set, tiny_splits)
    random = rmse(tiny_llama, rating, randomised(source_set, tiny_llama), tiny_splits)
    assert trained < random - 0.2


@pytest.mark.parametrize("input_rank", [None, 4])
def test_migrated_prompts_beat_random_prompts_on_the_target(
    tiny_llama: FoundationModel,
    tiny_gemma: FoundationModel,
    rating: Task,
    tiny_splits: Splits,
    source_set: PromptSet,
    input_rank: int | None,
) -> None:
    labels = tiny_splits.train_labels()
    users = select_users(
        "puma", prompts=source_set.prompts, labels=labels, user_ids=source_set.user_ids, budget=12
    ).users
    config = replace(ADAPTER_CONFIG, input_rank=input_rank)
    result = train_adapter(
        sources=[source_set],
        target=tiny_gemma,
        task=rating,
        splits=tiny_splits,
        users=users,
        config=config,
    )
    assert result.adapter.config.d_features == (input_rank or tiny_llama.hidden_size)
    assert result.adapter.network is not None
    migrated = migrate_all([source_set], result, target=tiny_gemma.name)
    assert migrated.user_ids == source_set.user_ids  # every user, not only the 12 trained
    assert migrated.prompts.shape == (24, 1, tiny_gemma.hidden_size)
    assert result.users_trained == 12
    random = rmse(tiny_gemma, rating, randomised(migrated, tiny_gemma), tiny_splits)
    assert rmse(tiny_gemma, rating, migrated, tiny_splits) < random - 0.15


def test_a_per_user_cap_trains_on_each_users_latest_interactions_only(
    tiny_gemma: FoundationModel, rating: Task, tiny_splits: Splits, source_set: PromptSet
) -> None:
    users = source_set.user_ids[:5]
    config = replace(ADAPTER_CONFIG, epochs=1, head_warmup_epochs=0, max_train_per_user=3)
    result = train_adapter(
        sources=[source_set],
        target=tiny_gemma,
        task=rating,
        splits=tiny_splits,
        users=users,
        config=config,
    )
    assert all(len(tiny_splits.train[u]) > 3 for u in users)
    assert result.example_passes == 5 * 3
    with pytest.raises(ValueError, match="max_train_per_user must be >= 1"):
        replace(config, max_train_per_user=0)


def test_the_adapter_reproduces_from_its_seed_whatever_ran_before(
    tiny_gemma: FoundationModel, rating: Task, tiny_splits: Splits, source_set: PromptSet
) -> None:
    config = MigrationConfig(hidden=16, epochs=1, head_warmup_epochs=0, seed=3)
    runs = []
    for unrelated in (1, 2):  # a worker process has drawn other numbers before each job
        torch.manual_seed(unrelated)
        torch.rand(unrelated)
        result = train_adapter(
            sources=[source_set],
            target=tiny_gemma,
            task=rating,
            splits=tiny_splits,
            users=source_set.user_ids[:6],
            config=config,
        )
        runs.append(result.adapter.state_dict())
    for name, value in runs[0].items():
        torch.testing.assert_close(runs[1][name], value, rtol=0, atol=0, msg=name)


def test_chain_and_round_trip_give_every_user_a_prompt(
    tiny_llama: FoundationModel,
    tiny_gemma: FoundationModel,
    rating: Task,
    tiny_splits: Splits,
    source_set: PromptSet,
) -> None:
    quick = MigrationConfig(hidden=16, epochs=1, head_warmup_epochs=0)
    users = source_set.user_ids[:6]
    hops = [(tiny_gemma, source_set), (tiny_llama, None)]  # A -> B -> A
    current = source_set
    for target, _ in hops:
        result = train_adapter(
            sources=[current],
            target=target,
            task=rating,
            splits=tiny_splits,
            users=users,
            config=quick,
        )
        current = migrate_all([current], result, target=target.name)
        assert current.prompts.shape == (24, 1, target.hidden_size)
        assert torch.isfinite(current.prompts).all()
    assert current.model == tiny_llama.name


def test_aggregation_concatenates_any_number_of_sources(
    tiny_llama: FoundationModel,
    tiny_gemma: FoundationModel,
    rating: Task,
    tiny_splits: Splits,
    source_set: PromptSet,
) -> None:
    second = randomised(source_set, tiny_gemma)
    third = randomised(source_set, tiny_llama)
    sources = [source_set, second, third]
    widths = tiny_llama.hidden_size * 2 + tiny_gemma.hidden_size
    assert stack_sources(sources, source_set.user_ids[:3]).shape == (3, 1, widths)
    result = train_adapter(
        sources=sources,
        target=tiny_gemma,
        task=rating,
        splits=tiny_splits,
        users=source_set.user_ids[:6],
        config=MigrationConfig(hidden=16, epochs=1, head_warmup_epochs=0),
    )
    assert result.adapter.config.d_in == widths
    merged = migrate_all(sources, result, target=tiny_gemma.name)
    assert merged.prompts.shape == (24, 1, tiny_gemma.hidden_size)


def test_instant_migration_costs_no_training_and_keeps_every_user(
    tiny_llama: FoundationModel, tiny_gemma: FoundationModel, source_set: PromptSet
) -> None:
    vocab_map = fit_vocab_map(tiny_llama, tiny_gemma)
    assert vocab_map.n_shared > 50
    instant = instant_migrate([source_set], [vocab_map], target=tiny_gemma.name)
    assert instant.user_ids == source_set.user_ids
    assert instant.prompts.shape == (24, 1, tiny_gemma.hidden_size)
