"""Blending the budget adapter's labels with the source model's predictions, on tiny models."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch

from models.data import Splits
from models.distill import blend_targets, source_predictions
from models.errors import ShapeMismatchError
from models.evaluation import predict_set
from models.foundation import FoundationModel
from models.loop import Examples, index_users
from models.migration import MigrationConfig, train_adapter
from models.prompts import PromptSet
from models.tasks import Task

CONFIG = MigrationConfig(
    hidden=16,
    epochs=2,
    lr=3e-3,
    batch_size=16,
    head_warmup_epochs=2,
    head_warmup_examples=32,
    seed=0,
)


def with_train_labels(splits: Splits, labels: np.ndarray) -> Splits:
    """``splits`` whose training interactions carry ``labels``, in the order they are listed."""
    values = iter(labels.tolist())
    train = {
        u: [replace(i, label=next(values)) for i in items] for u, items in splits.train.items()
    }
    return replace(splits, train=train)


def test_source_predictions_are_the_source_sets_own_and_count_one_pass_each(
    tiny_llama: FoundationModel, rating: Task, tiny_splits: Splits, source_set: PromptSet
) -> None:
    users = source_set.user_ids
    train = Examples.build(rating, tiny_splits.train, row_of=index_users(users))
    source = source_predictions(
        model=tiny_llama, task=rating, source=source_set, users=users, examples=train
    )
    served = predict_set(tiny_llama, rating, source_set, tiny_splits.train)
    np.testing.assert_allclose(source.predictions, served.predictions, atol=1e-5)
    assert source.cost.example_passes == len(train)
    assert source.label_probabilities.shape == (len(train), 5)
    np.testing.assert_allclose(source.label_probabilities.sum(axis=1), 1.0, rtol=1e-5)
    blended = blend_targets(train, source, task=rating, weight=0.25)
    np.testing.assert_allclose(
        blended.targets, 0.75 * train.targets + 0.25 * source.predictions, rtol=1e-6
    )
    label_class = np.eye(5)[train.targets.astype(int) - 1]
    assert blended.classes is not None
    np.testing.assert_allclose(
        blended.classes, 0.75 * label_class + 0.25 * source.label_probabilities, rtol=1e-5
    )


def test_with_full_weight_the_adapter_learns_from_the_source_not_the_labels(
    tiny_llama: FoundationModel,
    tiny_gemma: FoundationModel,
    rating: Task,
    tiny_splits: Splits,
    source_set: PromptSet,
) -> None:
    """Training labels replaced by noise change nothing once the source's predictions are the
    whole target; at half weight they do."""
    n_train = sum(len(items) for items in tiny_splits.train.values())
    noise = np.random.default_rng(0).integers(1, 6, n_train).astype(float)
    noisy = with_train_labels(tiny_splits, noise)

    def adapter_weights(splits: Splits, weight: float) -> list[torch.Tensor]:
        result = train_adapter(
            sources=[source_set],
            target=tiny_gemma,
            task=rating,
            splits=splits,
            users=source_set.user_ids,
            config=replace(CONFIG, distill_weight=weight),
            source_model=tiny_llama,
        )
        assert result.example_passes == 32 + 2 * n_train + n_train  # warm-up, epochs, source
        return [p.detach().clone() for p in result.adapter.parameters()]

    for clean, noised in zip(
        adapter_weights(tiny_splits, 1.0), adapter_weights(noisy, 1.0), strict=True
    ):
        torch.testing.assert_close(clean, noised)
    half = zip(adapter_weights(tiny_splits, 0.5), adapter_weights(noisy, 0.5), strict=True)
    assert any(not torch.equal(clean, noised) for clean, noised in half)


def test_distilling_needs_the_source_sets_own_model(
    tiny_gemma: FoundationModel, rating: Task, tiny_splits: Splits, source_set: PromptSet
) -> None:
    train_on = partial(
        train_adapter,
        sources=[source_set],
        target=tiny_gemma,
        task=rating,
        splits=tiny_splits,
        users=source_set.user_ids,
        config=replace(CONFIG, distill_weight=0.5),
    )
    with pytest.raises(ValueError, match="pass source_model"):
        train_on()
    with pytest.raises(ShapeMismatchError, match="32 wide and tiny-gemma is 48"):
        train_on(source_model=tiny_gemma)


@pytest.mark.parametrize("weight", [-0.1, 1.5])
def test_the_distillation_weight_is_a_share(weight: float) -> None:
    with pytest.raises(ValueError, match=r"distill_weight must lie in \[0, 1\]"):
        MigrationConfig(distill_weight=weight)
