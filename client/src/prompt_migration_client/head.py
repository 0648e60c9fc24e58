"""A bundle's task head applied in numpy: label logits ``[B, n_labels]`` -> predictions ``[B]``.

The bundle lists the head as steps (``models.contract.head_steps`` writes them); each step here
computes in float32, as the service's torch head does, so a consumer needs no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from prompt_migration_client.errors import ContractError

Weights = Mapping[str, np.ndarray]
Step = Callable[[dict[str, Any], np.ndarray, Weights], np.ndarray]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-x) without overflow for large |x|."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype)


def _weight(weights: Weights, name: str) -> np.ndarray:
    return np.asarray(weights[name], dtype=np.float32)


def _linear(step: dict[str, Any], x: np.ndarray, w: Weights) -> np.ndarray:
    return x @ _weight(w, step["weight"]).T + _weight(w, step["bias"])


def _affine(step: dict[str, Any], x: np.ndarray, w: Weights) -> np.ndarray:
    return _weight(w, step["scale"]) * x + _weight(w, step["bias"])


def _clamp(step: dict[str, Any], x: np.ndarray, _: Weights) -> np.ndarray:
    return np.clip(x, np.float32(step["min"]), np.float32(step["max"]))


STEPS: dict[str, Step] = {
    "center": lambda _, x, __: x - x.mean(-1, keepdims=True),
    "linear": _linear,
    "silu": lambda _, x, __: x * sigmoid(x),
    "squeeze": lambda _, x, __: x.squeeze(-1),
    "clamp": _clamp,
    "difference": lambda _, x, __: x[:, 1] - x[:, 0],
    "affine": _affine,
    "sigmoid": lambda _, x, __: sigmoid(x),
}


def apply_head(steps: list[dict[str, Any]], logits: Any, weights: Weights) -> np.ndarray:
    """``[B, n_labels]`` label logits (any array-like) -> ``[B]`` float32 predictions."""
    x = np.asarray(logits, dtype=np.float32)
    for step in steps:
        op = STEPS.get(step["op"])
        if op is None:
            raise ContractError(
                f"Unknown head step {step['op']!r} in the bundle: upgrade the client."
            )
        x = np.asarray(op(step, x, weights), dtype=np.float32)
    return x
