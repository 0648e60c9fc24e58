"""Tasks: the template around a user's prompt, the label words, the head, the loss and metrics.

``rating`` predicts 1..5 (the reference's 0.2 * cross-entropy over the five digit logits plus
0.8 * MSE of a small MLP head that reads them; RMSE and MAE over all test interactions).
``binary`` predicts Yes/No (BCE on a calibrated Yes-vs-No score; AUC and per-user uAUC).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import mean_absolute_error, roc_auc_score, root_mean_squared_error
from torch import nn
from torch.nn import functional as F

from models.errors import DataError


@dataclass(frozen=True)
class Template:
    """``prefix`` (with ``{item}``) + the user's prompt tokens + ``suffix``.

    The user's tokens come after the item and the instruction, so the frozen model's states over
    the prefix are computed once per item (see ``models.foundation``) and a training step runs
    only the user's tokens and the short suffix through the model.
    """

    prefix: str
    suffix: str

    def prefix_for(self, item_text: str) -> str:
        return self.prefix.format(item=item_text)


RATING_TEMPLATE = Template(
    prefix="#Question: Predict the user's rating (an integer between 1 and 5) for the movie "
    "{item}. We have information about the user's preferences encoded in the feature",
    suffix=".\n#Answer:",
)
BINARY_TEMPLATE = Template(
    prefix="#Question: Would the user enjoy the movie {item}? Answer Yes or No. We have "
    "information about the user's preferences encoded in the feature",
    suffix=".\n#Answer:",
)


class RatingHead(nn.Module):
    """Five digit logits -> a rating. Logits are centred first: their scale differs by model."""

    def __init__(self, *, mean_rating: float = 3.5) -> None:
        super().__init__()
        last = nn.Linear(12, 1)
        nn.init.constant_(last.bias, mean_rating)
        self.mlp = nn.Sequential(nn.Linear(5, 32), nn.SiLU(), nn.Linear(32, 12), nn.SiLU(), last)

    @staticmethod
    def features(logits: torch.Tensor) -> torch.Tensor:  # [B, 5] -> [B, 5]
        return logits - logits.mean(-1, keepdim=True)

    def read(self, features: torch.Tensor) -> torch.Tensor:  # [B, 5] -> [B]
        return self.mlp(features).squeeze(-1)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:  # [B, 5] -> [B]
        return self.read(self.features(logits))

    @torch.no_grad()
    def precompose(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Afterwards ``read(f)`` gives what ``read(f @ weight + bias)`` gave; weight ``[5, 5]``."""
        first = self.mlp[0]
        assert isinstance(first, nn.Linear)
        first.bias.add_(first.weight @ bias)
        first.weight.copy_(first.weight @ weight.T)


class BinaryHead(nn.Module):
    """(No, Yes) logits -> the log-odds of Yes, with a learned scale and bias."""

    def __init__(self, *, base_rate: float = 0.5) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        rate = min(max(base_rate, 1e-3), 1 - 1e-3)
        self.bias = nn.Parameter(torch.tensor(float(np.log(rate / (1 - rate)))))

    @staticmethod
    def features(logits: torch.Tensor) -> torch.Tensor:  # [B, 2] -> [B, 1]
        return logits[:, 1:] - logits[:, :1]

    def read(self, features: torch.Tensor) -> torch.Tensor:  # [B, 1] -> [B]
        return self.scale * features.squeeze(-1) + self.bias

    def forward(self, logits: torch.Tensor) -> torch.Tensor:  # [B, 2] -> [B]
        return self.read(self.features(logits))

    @torch.no_grad()
    def precompose(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Afterwards ``read(f)`` gives what ``read(f @ weight + bias)`` gave; weight ``[1, 1]``."""
        self.bias.add_(self.scale * bias.squeeze())
        self.scale.mul_(weight.squeeze())


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]
    template: Template
    metric_names: tuple[str, ...]
    primary_metric: str
    lower_is_better: bool

    def make_head(self, *, mean_target: float, seed: int = 0) -> RatingHead | BinaryHead:
        """A new head whose initial weights come from ``seed`` alone, whatever the process drew
        before (a worker runs many jobs), leaving the global random state as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.name == "rating":
                return RatingHead(mean_rating=mean_target)
            return BinaryHead(base_rate=mean_target)

    def load_head(self, state: dict[str, torch.Tensor]) -> RatingHead | BinaryHead:
        """A head holding the weights of a stored prompt set's ``head``."""
        head = self.make_head(mean_target=0.0)
        head.load_state_dict(state)
        return head

    def nearest_label(self, targets: torch.Tensor) -> torch.Tensor:
        """``[B]`` targets -> ``[B]`` index of each one's nearest label."""
        first = 1 if self.name == "rating" else 0  # ratings 1..5, Yes/No answers 0/1
        return (targets.round().long() - first).clamp(0, len(self.labels) - 1)

    def classes(self, targets: np.ndarray) -> np.ndarray:
        """``[n]`` targets -> ``[n, n_labels]`` float32: each one's nearest label, one-hot."""
        nearest = self.nearest_label(torch.from_numpy(targets))
        return F.one_hot(nearest, len(self.labels)).float().numpy()

    def loss(
        self, logits: torch.Tensor, head_out: torch.Tensor, targets: torch.Tensor,
        weights: torch.Tensor | None = None, classes: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """logits ``[B, n_labels]``, head_out ``[B]``, targets ``[B]`` -> scalar loss.

        ``weights`` ``[B]``: each example's share of a weighted mean (None: all equal).
        ``classes`` ``[B, n_labels]``: the distribution the rating task's cross-entropy fits
        (None: each target's nearest label).
        """
        reduction = "mean" if weights is None else "none"
        if self.name == "rating":
            wanted = self.nearest_label(targets) if classes is None else classes
            ce = F.cross_entropy(logits, wanted, reduction=reduction)
            loss = 0.2 * ce + 0.8 * F.mse_loss(head_out, targets, reduction=reduction)
        else:
            loss = F.binary_cross_entropy_with_logits(head_out, targets, reduction=reduction)
        if weights is None:
            return loss
        return (loss * weights).sum() / weights.sum()

    def predict(self, head_out: torch.Tensor) -> torch.Tensor:
        """Head output -> a rating in [1, 5] or a probability of Yes."""
        if self.name == "rating":
            return head_out.clamp(1.0, 5.0)
        return torch.sigmoid(head_out)

    def require_scorable(self, targets: np.ndarray, *, split: str) -> None:
        """Refuse a split whose ``targets`` cannot give the primary metric: AUC needs both
        answers, and an undefined metric would pick an epoch at random."""
        if self.name == "binary" and not _both_classes(targets):
            answer = self.labels[int(targets[0])] if len(targets) else "no"
            raise DataError(
                f"The {split} split holds only {answer!r} answers, so its AUC is undefined and "
                f"cannot choose an epoch: include users whose {split} interactions hold both "
                f"{' and '.join(map(repr, self.labels))}."
            )

    def metrics(
        self, *, user_ids: Sequence[str], targets: np.ndarray, predictions: np.ndarray
    ) -> dict[str, float | None]:
        """Global metrics over all given interactions (never averaged per batch)."""
        if len(targets) == 0:
            raise DataError("No interactions to evaluate: give at least one test interaction.")
        if self.name == "rating":
            return {
                "rmse": float(root_mean_squared_error(targets, predictions)),
                "mae": float(mean_absolute_error(targets, predictions)),
            }
        return {"auc": _auc(targets, predictions), "uauc": _uauc(user_ids, targets, predictions)}


def _both_classes(targets: np.ndarray) -> bool:
    return len(np.unique(targets)) == 2


def _auc(targets: np.ndarray, scores: np.ndarray) -> float | None:
    return float(roc_auc_score(targets, scores)) if _both_classes(targets) else None


def _uauc(user_ids: Sequence[str], targets: np.ndarray, scores: np.ndarray) -> float | None:
    """Mean AUC over users whose test interactions hold both classes."""
    rows: dict[str, list[int]] = defaultdict(list)
    for index, user in enumerate(user_ids):
        rows[user].append(index)
    aucs = [_auc(targets[idx], scores[idx]) for idx in rows.values()]
    valid = [a for a in aucs if a is not None]
    return float(np.mean(valid)) if valid else None


TASKS: dict[str, Task] = {
    "rating": Task("rating", ("1", "2", "3", "4", "5"), RATING_TEMPLATE, ("rmse", "mae"),
                   "rmse", lower_is_better=True),
    "binary": Task("binary", ("No", "Yes"), BINARY_TEMPLATE, ("auc", "uauc"),
                   "auc", lower_is_better=False),
}  # fmt: skip


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"Unknown task {name!r}: use one of {sorted(TASKS)}.")
    return TASKS[name]
