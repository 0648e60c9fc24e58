"""Start the adapter's linear path at each user's mean label, read off the source prompt.

A budget adapter learns from a few hundred users in a few thousand LM passes, and much of what a
user's prompt carries is the user's bias (REFERENCE.md). Two cheap estimates give a start that
already carries it:

- ``w`` ``[f]``: a ridge regression from the adapter's features of a user's source prompt to the
  user's mean training label, over the selected users. Labels are data: no LM pass.
- ``g`` ``[d_out]``: the target model's mean gradient of its prediction with respect to the prompt,
  over a sample of the selected users' training examples (one forward and backward pass each).

The linear path then starts at ``z -> g / |g|^2 * (w . z)`` on every prompt vector: to first order
each user's prediction moves by the offset the regression reads from the user's source prompt.
Training refines both the direction and the scale.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import torch
from sklearn.linear_model import RidgeCV
from torch import nn

from models.adapter import PumaAdapter
from models.adapter.model import AdapterPrompts
from models.errors import DataError
from models.foundation import FoundationModel
from models.loop import Examples, FitResult
from models.tasks import Task

# Ridge penalties tried by leave-one-out: the features are at unit scale, so this spans a near
# least-squares fit to a near-constant one.
RIDGE_ALPHAS = np.logspace(-1, 4, 11)


def user_mean_regression(features: torch.Tensor, means: np.ndarray) -> RidgeCV:
    """The ridge regression (weights ``coef_`` ``[f]``) reading each user's mean label from the
    user's features ``[n, l, f]`` (their mean over the prompt's ``l`` vectors)."""
    if len(means) < 3:
        raise DataError(
            f"A mean-label start needs at least 3 users to fit its regression, got {len(means)}: "
            "select more users or set start_from_user_means=False."
        )
    x = features.mean(1).double().cpu().numpy()
    return RidgeCV(alphas=RIDGE_ALPHAS).fit(x, means)


def prediction_gradient(
    *, model: FoundationModel, task: Task, prompt_source: AdapterPrompts, head: nn.Module,
    examples: Examples, batch_size: int,
) -> torch.Tensor:  # fmt: skip
    """``[d_out]``: the mean over ``examples`` of d(prediction) / d(prompt), summed over the
    prompt's vectors (the response to one shift of all of them)."""
    answer = model.answer_tokens(task.template.suffix, task.labels)
    model.warm_prefixes(examples.prefixes)  # at once: each warm-up forward runs a full batch
    prompt_source.eval()
    head.eval()
    total = torch.zeros(model.hidden_size, dtype=torch.float64)
    for start in range(0, len(examples), batch_size):
        rows = np.arange(start, min(start + batch_size, len(examples)))
        users = torch.from_numpy(examples.users[rows]).to(model.device)
        with torch.no_grad():
            prompts = prompt_source(users)
        prompts.requires_grad_(True)
        logits = model.label_logits([examples.prefixes[i] for i in rows], prompts, answer=answer)
        prediction = task.predict(head(logits).float())
        (grad,) = torch.autograd.grad(prediction.sum(), prompts)
        total += grad.sum((0, 1)).double().cpu()
    return (total / len(examples)).float()


def start_from_user_means(
    *, adapter: PumaAdapter, prompt_source: AdapterPrompts, users: list[str],
    labels: Mapping[str, list[float]], train: Examples, model: FoundationModel, task: Task,
    head: nn.Module, n_examples: int, batch_size: int, seed: int,
) -> FitResult:  # fmt: skip
    """Set ``adapter``'s linear path as the module docstring says. ``users`` are the rows of
    ``prompt_source``, ``labels`` their training labels; the gradient is taken over
    ``n_examples`` drawn from ``train``. The result counts those passes and the time taken."""
    start = time.perf_counter()
    means = np.array([np.mean(labels[u]) for u in users])
    with torch.no_grad():
        features = adapter.features(prompt_source.sources)
    ridge = user_mean_regression(features, means)
    rng = np.random.default_rng(seed)
    sample = train.subset(np.sort(rng.choice(len(train), min(n_examples, len(train)),
                                             replace=False)))  # fmt: skip
    gradient = prediction_gradient(model=model, task=task, prompt_source=prompt_source,
                                   head=head, examples=sample, batch_size=batch_size)  # fmt: skip
    norm = float(gradient.norm())
    if not norm > 0:
        raise DataError("The target model's prediction does not move with the prompt here: "
                        "set start_from_user_means=False.")  # fmt: skip
    # First order only: the prediction saturates along g, and rescaling the path until the
    # predictions moved by the full offsets scored worse on cpu-small (bench/README.md).
    direction = gradient / norm**2
    adapter.set_linear_path(
        torch.outer(direction, torch.from_numpy(ridge.coef_).float()).to(features)
    )
    return FitResult(
        seconds=time.perf_counter() - start, example_passes=len(sample),
        history=[{"mean_start": 1.0, "ridge_alpha": float(ridge.alpha_),
                  # Leave-one-out: the share of the users' spread in mean label the prompts explain.
                  "ridge_held_out_r2": 1.0 + float(ridge.best_score_) / max(float(np.var(means)), 1e-12),
                  "gradient_norm": norm}],
    )  # fmt: skip
