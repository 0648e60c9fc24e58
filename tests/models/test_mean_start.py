"""The mean-label start of the adapter's linear path, on tiny models with a per-user signal."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from models.adapter import AdapterConfig, PumaAdapter
from models.adapter.model import AdapterPrompts
from models.data import Splits
from models.errors import DataError
from models.foundation import FoundationModel
from models.loop import Examples, index_users, predict
from models.mean_start import start_from_user_means, user_mean_regression
from models.migration import MigrationConfig, train_adapter
from models.prompts import PromptSet
from models.tasks import Task


def per_user(values: np.ndarray, examples: Examples, n_users: int) -> np.ndarray:
    return np.bincount(examples.users, weights=values, minlength=n_users) / np.bincount(
        examples.users, minlength=n_users
    )


def test_the_start_moves_each_users_predictions_towards_the_users_mean(
    tiny_gemma: FoundationModel, rating: Task, tiny_splits: Splits, source_set: PromptSet
) -> None:
    users = source_set.user_ids
    torch.manual_seed(0)
    adapter = PumaAdapter(AdapterConfig(d_in=source_set.prompts.shape[-1], hidden=16,
                                        d_out=tiny_gemma.hidden_size,
                                        out_std=tiny_gemma.embedding_std))  # fmt: skip
    adapter.set_input_statistics(source_set.prompts)
    prompts = AdapterPrompts(adapter, source_set.rows(users))
    head = rating.load_head(source_set.head)
    train = Examples.build(rating, tiny_splits.train, row_of=index_users(users))
    before = predict(tiny_gemma, rating, prompts, head, train)
    result = start_from_user_means(
        adapter=adapter, prompt_source=prompts, users=users, labels=tiny_splits.train_labels(),
        train=train, model=tiny_gemma, task=rating, head=head, n_examples=64,
        batch_size=16, seed=0,
    )  # fmt: skip
    after = predict(tiny_gemma, rating, prompts, head, train)
    means = np.array([np.mean(tiny_splits.train_labels()[u]) for u in users])
    change = per_user(after - before, train, len(users))
    assert np.corrcoef(change, means)[0, 1] > 0.6
    [record] = result.history
    assert record["ridge_held_out_r2"] > 0.5  # the synthetic signal is in the source prompts
    assert result.example_passes == 64  # one gradient pass each


def test_the_regression_needs_a_few_users() -> None:
    with pytest.raises(DataError, match="at least 3 users"):
        user_mean_regression(torch.randn(2, 1, 4), np.array([3.0, 4.0]))


def test_train_adapter_counts_the_start_in_its_cost(
    tiny_gemma: FoundationModel, rating: Task, tiny_splits: Splits, source_set: PromptSet
) -> None:
    plain = MigrationConfig(hidden=16, epochs=1, head_warmup_epochs=0, batch_size=16)
    started = replace(plain, start_from_user_means=True, mean_start_examples=32)
    users = source_set.user_ids[:12]
    runs = [train_adapter(sources=[source_set], target=tiny_gemma, task=rating,
                          splits=tiny_splits, users=users, config=config)
            for config in (plain, started)]  # fmt: skip
    assert runs[1].example_passes == runs[0].example_passes + 32
    assert runs[1].history[0]["mean_start"] == 1.0


def test_config_refuses_two_starts_of_the_linear_path() -> None:
    with pytest.raises(ValueError, match="choose one"):
        MigrationConfig(start_from_user_means=True, start_from_vocab_map=True)
    with pytest.raises(ValueError, match="mean_start_examples"):
        MigrationConfig(mean_start_examples=0)
