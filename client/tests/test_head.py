"""The head in numpy, step by step, against values worked out by hand."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

from prompt_migration_client.errors import ContractError
from prompt_migration_client.head import apply_head, sigmoid

BINARY: list[dict[str, Any]] = [
    {"op": "difference"},
    {"op": "affine", "scale": "scale", "bias": "bias"},
    {"op": "sigmoid"},
]


def test_binary_head_is_the_probability_of_yes() -> None:
    weights = {"scale": np.array(2.0, np.float32), "bias": np.array(-0.5, np.float32)}
    logits = np.array([[1.0, 3.0], [0.0, 0.0]], np.float32)
    got = apply_head(BINARY, logits, weights)
    want = 1 / (1 + np.exp(-(2.0 * np.array([2.0, 0.0]) - 0.5)))
    assert got.dtype == np.float32 and got.shape == (2,)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_rating_head_centres_runs_the_mlp_and_clamps() -> None:
    rng = np.random.default_rng(0)
    w = {
        "mlp.0.weight": rng.normal(size=(4, 5)),
        "mlp.0.bias": rng.normal(size=4),
        "mlp.2.weight": rng.normal(size=(3, 4)),
        "mlp.2.bias": rng.normal(size=3),
        "mlp.4.weight": rng.normal(size=(1, 3)),
        "mlp.4.bias": np.array([3.5]),
    }
    steps: list[dict[str, Any]] = [
        {"op": "center"},
        {"op": "linear", "weight": "mlp.0.weight", "bias": "mlp.0.bias"},
        {"op": "silu"},
        {"op": "linear", "weight": "mlp.2.weight", "bias": "mlp.2.bias"},
        {"op": "silu"},
        {"op": "linear", "weight": "mlp.4.weight", "bias": "mlp.4.bias"},
        {"op": "squeeze"},
        {"op": "clamp", "min": 1.0, "max": 5.0},
    ]
    logits = rng.normal(size=(6, 5)) * 4

    def silu(x: np.ndarray) -> np.ndarray:
        return x / (1 + np.exp(-x))

    x = logits - logits.mean(-1, keepdims=True)
    x = silu(x @ w["mlp.0.weight"].T + w["mlp.0.bias"])
    x = silu(x @ w["mlp.2.weight"].T + w["mlp.2.bias"])
    want = np.clip((x @ w["mlp.4.weight"].T + w["mlp.4.bias"])[:, 0], 1, 5)
    np.testing.assert_allclose(apply_head(steps, logits, w), want, rtol=1e-5, atol=1e-5)
    # A constant shift of every logit does not move the rating: the head centres them first.
    np.testing.assert_allclose(
        apply_head(steps, logits + 7, w), apply_head(steps, logits, w), atol=1e-5
    )


def test_sigmoid_saturates_without_overflow() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = sigmoid(np.array([-1000.0, 0.0, 1000.0], np.float32))
    assert got.tolist() == [0.0, 0.5, 1.0]


def test_an_unknown_step_asks_for_a_newer_client() -> None:
    with pytest.raises(ContractError, match="Unknown head step 'softmax'"):
        apply_head([{"op": "softmax"}], np.zeros((1, 2)), {})
