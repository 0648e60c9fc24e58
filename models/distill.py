"""Soft targets from the source model: what each training example's user got before the upgrade.

A rating is a noisy draw around what the user thinks of the item, and a budget adapter sees only
a few thousand of them. The source prompts on the source model already predict every selected
user's examples: blending each label with that prediction gives the adapter a target with less
noise for the same target-model passes, at one source-model inference pass per example (counted
in the migration's cost like any other pass).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from models.errors import ShapeMismatchError
from models.evaluation import predict_examples
from models.foundation import FoundationModel
from models.loop import Examples, FitResult
from models.prompts import PromptSet
from models.tasks import Task


def source_predictions(
    *, model: FoundationModel, task: Task, source: PromptSet, users: list[str],
    examples: Examples,
) -> tuple[np.ndarray, FitResult]:  # fmt: skip
    """``[len(examples)]`` predictions of the source set on its own model (``examples.users``
    index ``users``), and what they cost."""
    if source.width != model.hidden_size:
        raise ShapeMismatchError(
            f"The source prompts are {source.width} wide and {model.name} is {model.hidden_size}: "
            f"distil from the model the source set was trained on ({source.model!r})."
        )
    model.warm_prefixes(examples.prefixes)  # the source model's item states, as it served them
    start = time.perf_counter()
    predictions = predict_examples(model, task, prompts=source.rows(users), head=source.head,
                                   examples=examples)  # fmt: skip
    cost = FitResult(seconds=time.perf_counter() - start, example_passes=len(examples))
    return predictions.astype(np.float32), cost


def blend_targets(examples: Examples, predictions: np.ndarray, *, weight: float) -> Examples:
    """``examples`` whose targets are ``(1 - weight) * label + weight * prediction``."""
    targets = (1.0 - weight) * examples.targets + weight * predictions
    return replace(examples, targets=targets.astype(np.float32))
