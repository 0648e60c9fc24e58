"""Held-out evaluation of a prompt set, and paired bootstrap intervals between two methods."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from models.data import Interaction
from models.errors import DataError
from models.foundation import FoundationModel
from models.loop import Examples, PromptTable, head_predictions, index_users, label_logits
from models.prompts import PromptSet
from models.tasks import Task


@dataclass(frozen=True)
class Predictions:
    user_ids: list[str]
    targets: np.ndarray
    predictions: np.ndarray


def predict_set(
    model: FoundationModel,
    task: Task,
    prompt_set: PromptSet,
    interactions: dict[str, list[Interaction]],
    *,
    batch_size: int = 64,
) -> Predictions:
    """Predictions for every interaction of the set's users (others are not scored)."""
    model.check_prompts(prompt_set.prompts[:1])
    row_of = index_users(prompt_set.user_ids)
    examples = Examples.build(task, interactions, row_of=row_of)
    out = predict_examples(
        model,
        task,
        prompts=prompt_set.prompts,
        head=prompt_set.head,
        examples=examples,
        batch_size=batch_size,
    )
    return Predictions(examples.user_ids, examples.targets, out)


def predict_examples(
    model: FoundationModel,
    task: Task,
    *,
    prompts: torch.Tensor,
    head: dict[str, torch.Tensor],
    examples: Examples,
    batch_size: int = 64,
) -> np.ndarray:
    """Predictions for ``examples``, whose ``users`` index ``prompts`` ``[n, l, d]``, through a
    stored ``head``'s weights."""
    logits = example_logits(model, task, prompts=prompts, examples=examples, batch_size=batch_size)
    return head_predictions(task, task.load_head(head).to(model.device), logits)


def example_logits(
    model: FoundationModel,
    task: Task,
    *,
    prompts: torch.Tensor,
    examples: Examples,
    batch_size: int = 64,
) -> torch.Tensor:
    """``[len(examples), n_labels]`` label logits of ``examples``, whose ``users`` index
    ``prompts`` ``[n, l, d]``."""
    table = PromptTable(prompts).to(model.device)
    return label_logits(model, task, table, examples, batch_size=batch_size)


def within_user_corr(
    user_ids: list[str], targets: np.ndarray, predictions: np.ndarray
) -> float | None:
    """Mean, over users whose targets vary, of the Pearson correlation between their predictions
    and their targets: whether the predictions order a user's own items, which RMSE hides when
    they only carry each user's level. A user whose predictions do not vary counts as 0 (they
    order nothing); None when no user's targets vary."""
    rows: dict[str, list[int]] = defaultdict(list)
    for index, user in enumerate(user_ids):
        rows[user].append(index)
    correlations = []
    for members in rows.values():
        y = np.asarray(targets[members], dtype=np.float64)
        p = np.asarray(predictions[members], dtype=np.float64)
        if len(y) < 2 or np.ptp(y) == 0:
            continue
        if np.ptp(p) == 0:
            correlations.append(0.0)
            continue
        y, p = y - y.mean(), p - p.mean()
        correlations.append(float((y * p).sum() / np.sqrt((y**2).sum() * (p**2).sum())))
    return float(np.mean(correlations)) if correlations else None


def metrics_of(task: Task, predictions: Predictions) -> dict[str, float | None]:
    """The task's metrics over ``predictions`` (for ``rating``, with ``within_user_corr``; the
    ``binary`` task's per-user measure is its uAUC), and how many users and interactions."""
    values = task.metrics(
        user_ids=predictions.user_ids,
        targets=predictions.targets,
        predictions=predictions.predictions,
    )
    if task.name == "rating":
        values["within_user_corr"] = within_user_corr(
            predictions.user_ids, predictions.targets, predictions.predictions
        )
    return values | {
        "n_users": float(len(set(predictions.user_ids))),
        "n_interactions": float(len(predictions.targets)),
    }


def evaluate(
    model: FoundationModel,
    task: Task,
    prompt_set: PromptSet,
    interactions: dict[str, list[Interaction]],
) -> dict[str, float | None]:
    """Task metrics over the interactions of the set's users, computed globally, and how many
    users with interactions have no prompt in the set (they are not scored)."""
    without_prompt = set(interactions) - set(prompt_set.user_ids)
    metrics = metrics_of(task, predict_set(model, task, prompt_set, interactions))
    return metrics | {"n_users_without_prompt": float(len(without_prompt))}


def baseline_metrics(
    task: Task, *, train: dict[str, list[Interaction]], test: dict[str, list[Interaction]]
) -> dict[str, float | None]:
    """The task metrics of no personalisation: every test interaction predicted as the training
    data's global mean (the mean rating, or the base rate for ``binary``). A prompt set that
    does worse than this is worse than serving no prompt at all."""
    labels = [i.label for interactions in train.values() for i in interactions]
    if not labels:
        raise DataError("No training interactions: the non-personalised baseline needs some.")
    scored = [(i.user_id, i.label) for interactions in test.values() for i in interactions]
    user_ids = [user for user, _ in scored]
    targets = np.asarray([label for _, label in scored], dtype=np.float64)
    constant = np.full(len(targets), float(np.mean(labels)))
    return metrics_of(task, Predictions(user_ids, targets, constant))


def paired_bootstrap_rmse_diff(
    *,
    user_ids: list[str],
    targets: np.ndarray,
    pred: np.ndarray,
    baseline: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """95% interval of RMSE(pred) - RMSE(baseline), resampling users with replacement."""
    users, inverse = np.unique(np.asarray(user_ids), return_inverse=True)
    count = np.bincount(inverse, minlength=len(users)).astype(float)
    sse_a = np.bincount(inverse, weights=(pred - targets) ** 2, minlength=len(users))
    sse_b = np.bincount(inverse, weights=(baseline - targets) ** 2, minlength=len(users))
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(users), np.full(len(users), 1 / len(users)), size=n_boot)
    n = weights @ count
    diff = np.sqrt(weights @ sse_a / n) - np.sqrt(weights @ sse_b / n)
    low, high = np.percentile(diff, [2.5, 97.5])
    return float(low), float(high)
