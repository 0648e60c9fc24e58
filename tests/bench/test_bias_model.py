"""The bias_model row of the quality benchmark: global + user + item offsets, shrunk toward 0."""

from __future__ import annotations

import numpy as np
import pytest

from bench import quality
from models.data import Interaction, Splits
from models.tasks import get_task


def _interactions(
    rng: np.random.Generator,
    user_level: dict[str, float],
    item_level: dict[str, float],
    n: int,
    noise: float,
) -> dict[str, list[Interaction]]:
    part: dict[str, list[Interaction]] = {}
    items = sorted(item_level)
    for user, level in user_level.items():
        chosen = rng.choice(items, size=n, replace=False)
        part[user] = [
            Interaction(
                user, item, item, float(3.0 + level + item_level[item] + rng.normal(0, noise)), t
            )
            for t, item in enumerate(chosen)
        ]
    return part


def test_with_no_shrinkage_and_no_noise_it_recovers_the_offsets() -> None:
    rng = np.random.default_rng(0)
    users = {f"u{k}": float(v) for k, v in enumerate(rng.normal(0, 0.5, 30))}
    items = {f"i{k}": float(v) for k, v in enumerate(rng.normal(0, 0.5, 20))}
    train = _interactions(rng, users, items, 15, noise=0.0)
    model = quality.BiasModel.fit(train, user_shrink=0.0, item_shrink=0.0, sweeps=200)
    labels = np.array([i.label for v in train.values() for i in v])
    fitted = model.predict(train, ("-100", "100"))
    assert np.abs(fitted - labels).max() < 1e-3
    # an item never rated gets no offset, and predictions stay on the rating scale
    unseen = {"u0": [Interaction("u0", "new", "new", 3.0, 0.0)]}
    assert model.predict(unseen, ("1", "5"))[0] == pytest.approx(
        min(5.0, max(1.0, model.mean + model.user["u0"])), abs=1e-5
    )


def test_shrinkage_is_chosen_on_validation_and_beats_none_on_noisy_sparse_items() -> None:
    rng = np.random.default_rng(1)
    users = {f"u{k}": float(v) for k, v in enumerate(rng.normal(0, 0.4, 200))}
    items = {f"i{k}": float(v) for k, v in enumerate(rng.normal(0, 0.3, 300))}
    # a rating of many items by few users: item means from few ratings are mostly noise
    train = _interactions(rng, users, items, 8, noise=1.0)
    val = _interactions(rng, users, items, 5, noise=1.0)
    test = _interactions(rng, users, items, 5, noise=1.0)
    splits = Splits(train, val, test)
    task = get_task("rating")
    chosen = quality.fit_bias_model(splits, task)
    assert chosen.item_shrink > 0 and chosen.user_shrink > 0
    y = np.array([i.label for v in test.values() for i in v])

    def rmse(model: quality.BiasModel) -> float:
        return float(np.sqrt(np.mean((model.predict(test, task.labels) - y) ** 2)))

    unshrunk = quality.BiasModel.fit(train, user_shrink=0.0, item_shrink=0.0)
    assert rmse(chosen) < rmse(unshrunk)
