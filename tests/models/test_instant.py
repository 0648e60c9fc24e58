"""Instant migration's head transfer: a head fitted on one model that reads another's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.adapter.model import adapter_from_bytes, adapter_to_bytes
from models.data import Splits
from models.evaluation import predict_set
from models.foundation import FoundationModel
from models.instant import fit_vocab_map, instant_migrate, stacked_map, transfer_head
from models.migration import map_prompts
from models.prompts import PromptSet
from models.tasks import Task
from models.training import random_prompts


@pytest.fixture(scope="module")
def source_set(tiny_llama: FoundationModel, rating: Task) -> PromptSet:
    """Random real-token prompts of the tiny set's 24 users and a head seeded apart."""
    prompts = random_prompts(tiny_llama, n_users=24, prompt_length=1, seed=5)
    head = rating.make_head(mean_target=3.5, seed=5)
    users = [f"u{u}" for u in range(24)]
    return PromptSet(tiny_llama.name, rating.name, users, prompts, head.state_dict())


def test_a_head_transferred_to_its_own_model_predicts_as_before(
    tiny_llama: FoundationModel, rating: Task, source_set: PromptSet, tiny_splits: Splits
) -> None:
    """Target = source: the logit fit is the identity on the head's features."""
    transferred = transfer_head(
        rating,
        source=tiny_llama,
        source_set=source_set,
        target=tiny_llama,
        target_set=source_set,
        item_texts=tiny_splits.train_item_texts(),
        n_pairs=128,
    )
    assert transferred.r2 > 0.99
    assert transferred.passes == 256
    before, after = rating.load_head(source_set.head), rating.load_head(transferred.state)
    logits = torch.randn(32, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(after(logits), before(logits), rtol=0.01, atol=0.01)


def test_a_head_transferred_across_models_moves_toward_the_source_predictions(
    tiny_llama: FoundationModel,
    tiny_gemma: FoundationModel,
    rating: Task,
    source_set: PromptSet,
    tiny_splits: Splits,
) -> None:
    """On the target, the transferred head's predictions are nearer the source's than the
    source head read unchanged."""
    instant = instant_migrate(
        [source_set], [fit_vocab_map(tiny_llama, tiny_gemma)], target=tiny_gemma.name
    )
    head = transfer_head(
        rating,
        source=tiny_llama,
        source_set=source_set,
        target=tiny_gemma,
        target_set=instant,
        item_texts=tiny_splits.train_item_texts(),
        n_pairs=256,
    )
    assert 0.0 <= head.r2 <= 1.0
    reference = predict_set(tiny_llama, rating, source_set, tiny_splits.test).predictions
    unchanged = predict_set(tiny_gemma, rating, instant, tiny_splits.test).predictions
    instant.head = head.state
    transferred = predict_set(tiny_gemma, rating, instant, tiny_splits.test).predictions
    assert ((transferred >= 1) & (transferred <= 5)).all()
    gap = lambda p: float(np.sqrt(np.mean((p - reference) ** 2)))  # noqa: E731
    assert gap(transferred) < gap(unchanged)


def test_the_map_as_an_adapter_maps_like_the_map_after_a_round_trip(
    tiny_llama: FoundationModel, tiny_gemma: FoundationModel, source_set: PromptSet
) -> None:
    """The service stores an instant migration as an adapter: it must be the same map."""
    maps = [fit_vocab_map(tiny_llama, tiny_gemma)] * 2  # aggregated: two sources
    stored = adapter_from_bytes(adapter_to_bytes(stacked_map(maps).as_adapter()))
    sources = torch.cat([source_set.prompts, 2 * source_set.prompts], dim=-1)
    expected = instant_migrate(
        [
            source_set,
            PromptSet(
                source_set.model,
                source_set.task,
                source_set.user_ids,
                2 * source_set.prompts,
                source_set.head,
            ),
        ],
        maps,
        target=tiny_gemma.name,
    ).prompts
    got = map_prompts(stored, sources)
    assert got.shape == (24, 1, tiny_gemma.hidden_size)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
