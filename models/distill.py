"""Soft targets from the source model: what each training example's user got before the upgrade.

A rating is a noisy draw around what the user thinks of the item, and a budget adapter sees only
a few thousand of them. The source prompts on the source model already predict every selected
user's examples: blending each label with that prediction gives the adapter a target with less
noise for the same target-model passes, at one source-model inference pass per example (counted
in the migration's cost like any other pass). The same pass gives the source's distribution over
the labels, which the task's cross-entropy fits in place of the label's class alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from models.errors import ShapeMismatchError
from models.evaluation import example_logits
from models.foundation import FoundationModel
from models.loop import Examples, FitResult, head_predictions
from models.prompts import PromptSet
from models.tasks import Task


@dataclass(frozen=True)
class SourcePredictions:
    predictions: np.ndarray  # [n] float32: the source head's prediction of each example
    label_probabilities: np.ndarray  # [n, n_labels] float32: softmax of its label logits
    cost: FitResult


def source_predictions(
    *,
    model: FoundationModel,
    task: Task,
    source: PromptSet,
    users: list[str],
    examples: Examples,
) -> SourcePredictions:
    """What the source set predicts for ``examples`` (whose ``users`` index ``users``) on its own
    model, and what that cost."""
    if source.width != model.hidden_size:
        raise ShapeMismatchError(
            f"The source prompts are {source.width} wide and {model.name} is {model.hidden_size}: "
            f"distil from the model the source set was trained on ({source.model!r})."
        )
    model.warm_prefixes(examples.prefixes)  # the source model's item states, as it served them
    start = time.perf_counter()
    logits = example_logits(model, task, prompts=source.rows(users), examples=examples)
    predictions = head_predictions(task, task.load_head(source.head).to(model.device), logits)
    cost = FitResult(seconds=time.perf_counter() - start, example_passes=len(examples))
    return SourcePredictions(
        predictions=predictions.astype(np.float32),
        label_probabilities=torch.softmax(logits, dim=-1).numpy(),
        cost=cost,
    )


def blend_targets(
    examples: Examples, source: SourcePredictions, *, task: Task, weight: float
) -> Examples:
    """``examples`` whose targets are ``(1 - weight) * label + weight * prediction``, and whose
    cross-entropy fits ``(1 - weight) * the label's class + weight * the source's distribution``."""
    targets = (1.0 - weight) * examples.targets + weight * source.predictions
    classes = (1.0 - weight) * task.classes(examples.targets) + weight * source.label_probabilities
    return replace(examples, targets=targets.astype(np.float32), classes=classes.astype(np.float32))
