"""Per-user prompt training: a model's first prompt set, onboarding, and the retraining baseline.

All users' prompts live in one table and train together in one batched loop with the task head.
Each prompt starts as real token embeddings of the model (an all-zero start gives NaN gradients).
By default every user starts at the same word: a trained prompt is then that shared start plus
what the user's data taught, so prompts differ only by preference. Random tokens per user would
bury that signal under token identity, and a migration adapter fitted on a few users would learn
the noise (and K-means would cluster token identities instead of tastes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from models.data import Splits
from models.errors import DataError
from models.foundation import FoundationModel
from models.loop import Examples, FitResult, ProgressFn, PromptTable, StopFn, fit, index_users
from models.prompts import PromptSet
from models.tasks import Task


@dataclass(frozen=True)
class PromptTrainingConfig:
    epochs: int = 6
    lr: float = 2e-3  # per-user rows see ~30 gradients an epoch: higher than the reference 5e-4
    head_lr: float = 2e-3
    batch_size: int = 32
    patience: int = 2  # epochs without validation gain before stopping
    prompt_length: int = 1  # l: tokens per user; 1 in the reference, 8 for a TAP-PER-style prefix
    init: Literal["shared", "random"] = "shared"  # one start word for all users, or random tokens
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience", "prompt_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"PromptTrainingConfig.{name} must be >= 1.")
        if self.lr <= 0 or self.head_lr <= 0:
            raise ValueError("PromptTrainingConfig learning rates must be positive.")
        if self.init not in ("shared", "random"):
            raise ValueError(
                f"PromptTrainingConfig.init must be 'shared' or 'random', got {self.init!r}."
            )


@dataclass
class TrainingResult:
    prompt_set: PromptSet
    seconds: float
    example_passes: int
    history: list[dict[str, float]] = field(default_factory=list)
    fit: FitResult | None = None


SHARED_START_WORD = " user"  # neutral where the template says "encoded in the feature <UserID>"


def random_prompts(
    model: FoundationModel, *, n_users: int, prompt_length: int, seed: int
) -> torch.Tensor:
    """Random real token embeddings of ``model``: ``[n_users, l, d]`` fp32."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.embedding_table.shape[0]
    ids = torch.randint(0, vocab, (n_users, prompt_length), generator=generator)
    return model.raw_embeddings(ids).cpu()


def shared_start_prompts(
    model: FoundationModel, *, n_users: int, prompt_length: int
) -> torch.Tensor:
    """Every user at the embeddings of ``SHARED_START_WORD``, cycled to ``l``: ``[n, l, d]``."""
    ids = model.token_ids(SHARED_START_WORD) or [0]
    row = torch.tensor([ids[i % len(ids)] for i in range(prompt_length)])
    return model.raw_embeddings(row).cpu().expand(n_users, -1, -1).clone()


def init_prompts(
    model: FoundationModel, *, n_users: int, config: PromptTrainingConfig
) -> torch.Tensor:
    """Starting prompts as ``config.init`` says: ``[n_users, l, d]`` fp32."""
    if config.init == "random":
        return random_prompts(
            model, n_users=n_users, prompt_length=config.prompt_length, seed=config.seed
        )
    return shared_start_prompts(model, n_users=n_users, prompt_length=config.prompt_length)


def mean_target(splits: Splits) -> float:
    labels = [i.label for items in splits.train.values() for i in items]
    if not labels:
        raise DataError("No training interactions at all: supply data with labels.")
    return float(np.mean(labels))


def train_prompts(
    model: FoundationModel,
    task: Task,
    splits: Splits,
    *,
    config: PromptTrainingConfig,
    users: list[str] | None = None,
    initial: PromptSet | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> TrainingResult:
    """Train prompts of ``users`` (default: every user with training data) and the head.

    ``initial`` continues from an existing set of the same model (its rows and head).
    """
    users = users or splits.users
    splits.require_training_data(users)
    row_of = index_users(users)
    if initial is not None:
        start = initial.rows(users)
    else:
        start = init_prompts(model, n_users=len(users), config=config)
    table = PromptTable(start).to(model.device)
    head = task.make_head(mean_target=mean_target(splits), seed=config.seed).to(model.device)
    if initial is not None:
        head.load_state_dict(initial.head)
    optimizer = torch.optim.Adam(
        [
            {"params": table.parameters(), "lr": config.lr},
            {"params": head.parameters(), "lr": config.head_lr},
        ]
    )
    result = fit(
        model=model,
        task=task,
        prompt_source=table,
        head=head,
        optimizer=optimizer,
        train=Examples.build(task, splits.train, row_of=row_of),
        val=Examples.build(task, splits.val, row_of=row_of),
        epochs=config.epochs,
        batch_size=config.batch_size,
        patience=config.patience,
        seed=config.seed,
        on_progress=on_progress,
        should_stop=should_stop,
    )
    prompt_set = PromptSet(
        model=model.name,
        task=task.name,
        user_ids=list(users),
        prompts=table.weight.detach().float().cpu(),
        head={k: v.detach().float().cpu() for k, v in head.state_dict().items()},
    )
    return TrainingResult(prompt_set, result.seconds, result.example_passes, result.history, result)
