"""The one training loop: user indices -> prompts -> frozen LM -> label logits -> head -> loss.

Per-user prompt training and adapter training differ only in the module that turns a batch of
user indices into prompts (a table, or an adapter over frozen source prompts) and in what the
optimizer updates. Best epoch by the validation split's primary metric; early stop on patience.
When only the head learns, ``fit_head`` runs the LM once per example and fits on those logits.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from models.data import Interaction
from models.errors import Cancelled, DataError
from models.foundation import AnswerTokens, FoundationModel
from models.tasks import Task

ProgressFn = Callable[[dict[str, float]], None]
StopFn = Callable[[], bool]


@dataclass(frozen=True)
class Examples:
    """A flat batchable view of interactions: row i is user ``users[i]`` on ``prefixes[i]``."""

    users: np.ndarray  # [n] int: row of the user in the prompt source
    prefixes: list[str]
    targets: np.ndarray  # [n] float32
    user_ids: list[str]
    # [n] float32: each example's weight in the training loss; None weighs all alike.
    weights: np.ndarray | None = None
    # [n, n_labels] float32: the distribution the task's cross-entropy fits, when softer than
    # the target's own label (Task.loss); None: the target's label.
    classes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.prefixes)

    def subset(self, rows: np.ndarray) -> Examples:
        return Examples(
            users=self.users[rows],
            prefixes=[self.prefixes[i] for i in rows],
            targets=self.targets[rows],
            user_ids=[self.user_ids[i] for i in rows],
            weights=None if self.weights is None else self.weights[rows],
            classes=None if self.classes is None else self.classes[rows],
        )

    @classmethod
    def build(
        cls,
        task: Task,
        part: dict[str, list[Interaction]],
        *,
        row_of: dict[str, int],
        user_weights: Mapping[str, float] | None = None,
    ) -> Examples:
        """Every interaction of the users in ``row_of``; ``user_weights`` weighs each user's
        examples in the training loss (a user missing from it weighs 1)."""
        rows = [(row_of[u], i) for u, items in part.items() if u in row_of for i in items]
        weights = None
        if user_weights is not None:
            weights = np.array([user_weights.get(i.user_id, 1.0) for _, i in rows], np.float32)
        return cls(
            users=np.array([r for r, _ in rows], dtype=np.int64),
            prefixes=[task.template.prefix_for(i.item_text) for _, i in rows],
            targets=np.array([i.label for _, i in rows], dtype=np.float32),
            user_ids=[i.user_id for _, i in rows],
            weights=weights,
        )


class PromptTable(nn.Module):
    """Trainable per-user prompts: ``weight`` ``[n_users, l, d]``."""

    def __init__(self, initial: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(initial.clone().float())

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        return self.weight[users]


@dataclass
class FitResult:
    seconds: float = 0.0
    example_passes: int = 0
    best_epoch: int = -1
    best_metric: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def _batch_logits(
    model: FoundationModel,
    prompt_source: nn.Module,
    examples: Examples,
    rows: np.ndarray,
    answer: AnswerTokens,
) -> torch.Tensor:
    """``[len(rows), n_labels]`` label logits of the examples at ``rows``."""
    users = torch.from_numpy(examples.users[rows]).to(model.device)
    return model.label_logits(
        [examples.prefixes[i] for i in rows], prompt_source(users), answer=answer
    )


@torch.no_grad()
def label_logits(
    model: FoundationModel,
    task: Task,
    prompt_source: nn.Module,
    examples: Examples,
    *,
    batch_size: int = 64,
) -> torch.Tensor:
    """``[n, n_labels]`` fp32 label logits of every example, in order, without gradients."""
    if len(examples) == 0:
        raise DataError("Nothing to predict: the split holds no interactions for these users.")
    answer = model.answer_tokens(task.template.suffix, task.labels)
    # Every missing item at once: warm-up forwards run full batches, so per-batch warming would
    # pay for a full batch over each batch's few new items.
    model.warm_prefixes(examples.prefixes)
    prompt_source.eval()
    # Sorting by prefix keeps batches of similar length: less padding.
    order = np.argsort([len(p) for p in examples.prefixes], kind="stable")
    out = torch.empty(len(examples), len(answer.label_ids))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        logits = _batch_logits(model, prompt_source, examples, rows, answer)
        out[torch.from_numpy(rows)] = logits.float().cpu()
    return out


def predict(
    model: FoundationModel,
    task: Task,
    prompt_source: nn.Module,
    head: nn.Module,
    examples: Examples,
    *,
    batch_size: int = 64,
) -> np.ndarray:
    """Predictions (ratings or probabilities) for every example, in order."""
    logits = label_logits(model, task, prompt_source, examples, batch_size=batch_size)
    return head_predictions(task, head, logits)


def head_predictions(task: Task, head: nn.Module, logits: torch.Tensor) -> np.ndarray:
    """``[n, n_labels]`` label logits -> ``[n]`` predictions through ``head``."""
    head.eval()
    with torch.no_grad():
        device = next(head.parameters()).device
        return task.predict(head(logits.to(device)).float()).cpu().numpy()


def _batch_targets(
    examples: Examples, rows: np.ndarray, *, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The targets, loss weights and class distributions of the examples at ``rows``."""

    def take(values: np.ndarray | None) -> torch.Tensor | None:
        return None if values is None else torch.from_numpy(values[rows]).to(device)

    targets = torch.from_numpy(examples.targets[rows]).to(device)
    return targets, take(examples.weights), take(examples.classes)


def score(task: Task, examples: Examples, predictions: np.ndarray) -> float:
    metrics = task.metrics(
        user_ids=examples.user_ids, targets=examples.targets, predictions=predictions
    )
    value = metrics[task.primary_metric]
    return float("nan") if value is None else value


@dataclass
class _BestEpoch:
    """Keeps ``result``'s best validation epoch and a copy of the modules' state at it."""

    task: Task
    modules: tuple[nn.Module, ...]
    result: FitResult
    waited: int = 0  # epochs since the last improvement
    state: list[dict[str, torch.Tensor]] | None = None

    def record(self, epoch: int, metric: float) -> None:
        best = self.result.best_metric
        lower = self.task.lower_is_better
        if best is None or (metric < best if lower else metric > best):
            self.result.best_metric, self.result.best_epoch, self.waited = metric, epoch, 0
            self.state = copy.deepcopy([m.state_dict() for m in self.modules])
        else:
            self.waited += 1

    def restore(self) -> None:
        if self.state is not None:
            for module, state in zip(self.modules, self.state, strict=True):
                module.load_state_dict(state)


def _validation(task: Task, val: Examples | None) -> Examples | None:
    """``val`` when it can choose an epoch, None when it is empty; refuses one it cannot score."""
    if val is None or len(val) == 0:
        return None
    task.require_scorable(val.targets, split="validation")
    return val


def fit(
    *,
    model: FoundationModel,
    task: Task,
    prompt_source: nn.Module,
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: Examples,
    val: Examples | None,
    epochs: int,
    batch_size: int,
    patience: int,
    seed: int,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> FitResult:
    """Train for up to ``epochs``; keep the state of the best validation epoch."""
    if len(train) == 0:
        raise DataError("No training interactions for the chosen users: pick users with data.")
    val = _validation(task, val)
    answer = model.answer_tokens(task.template.suffix, task.labels)
    model.warm_prefixes(train.prefixes + (val.prefixes if val else []))
    steps_per_epoch = -(-len(train) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=max(1, epochs * steps_per_epoch),
        pct_start=0.1,
        anneal_strategy="cos",
    )
    generator = np.random.default_rng(seed)
    result = FitResult()
    best = _BestEpoch(task, (prompt_source, head), result)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    start = time.perf_counter()
    for epoch in range(epochs):
        prompt_source.train()
        head.train()
        order, losses = generator.permutation(len(train)), []
        for step, begin in enumerate(range(0, len(order), batch_size)):
            if should_stop and should_stop():
                raise Cancelled("stopped on request")
            rows = order[begin : begin + batch_size]
            logits = _batch_logits(model, prompt_source, train, rows, answer)
            targets, weights, classes = _batch_targets(train, rows, device=model.device)
            loss = task.loss(logits, head(logits).float(), targets, weights, classes)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            result.example_passes += len(rows)
            if on_progress:
                on_progress(
                    {
                        "epoch": epoch,
                        "fraction": (epoch + (step + 1) / steps_per_epoch) / epochs,
                        "loss": losses[-1],
                    }
                )
        record = {"epoch": float(epoch), "train_loss": float(np.mean(losses))}
        if val is not None:
            metric = score(task, val, predict(model, task, prompt_source, head, val))
            record["val_" + task.primary_metric] = metric
            best.record(epoch, metric)
        result.history.append(record)
        if val is not None and best.waited >= patience:
            break
    best.restore()
    result.seconds = time.perf_counter() - start
    return result


def fit_head(
    *,
    model: FoundationModel,
    task: Task,
    prompt_source: nn.Module,
    head: nn.Module,
    train: Examples,
    val: Examples | None,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    max_examples: int | None = None,
) -> FitResult:
    """Fit only the head, on label logits computed once.

    With the prompts frozen the LM's logits are the same every epoch, so the LM runs once per
    example, not once per example and epoch. ``max_examples`` samples the training set: a head of
    a few hundred weights needs far fewer examples than the prompts do.
    """
    if len(train) == 0:
        raise DataError("No training interactions for the chosen users: pick users with data.")
    val = _validation(task, val)
    generator = np.random.default_rng(seed)
    if max_examples is not None and len(train) > max_examples:
        train = train.subset(np.sort(generator.choice(len(train), max_examples, replace=False)))
    # The item cache's fill stays out of the timed span, as in fit: it is paid once per model.
    model.warm_prefixes(train.prefixes + (val.prefixes if val else []))
    start = time.perf_counter()
    device = next(head.parameters()).device
    logits = label_logits(model, task, prompt_source, train).to(device)
    val_logits = label_logits(model, task, prompt_source, val) if val is not None else None
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    result = FitResult(example_passes=len(train))
    best = _BestEpoch(task, (head,), result)
    for epoch in range(epochs):
        head.train()
        order, losses = generator.permutation(len(train)), []
        for begin in range(0, len(order), batch_size):
            rows = order[begin : begin + batch_size]
            batch = logits[torch.from_numpy(rows).to(device)]
            targets, weights, classes = _batch_targets(train, rows, device=device)
            loss = task.loss(batch, head(batch).float(), targets, weights, classes)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        record = {"epoch": float(epoch), "train_loss": float(np.mean(losses))}
        if val_logits is not None and val is not None:
            metric = score(task, val, head_predictions(task, head, val_logits))
            record["val_" + task.primary_metric] = metric
            best.record(epoch, metric)
        result.history.append(record)
    best.restore()
    result.seconds = time.perf_counter() - start
    return result


def index_users(user_ids: Sequence[str]) -> dict[str, int]:
    return {user: row for row, user in enumerate(user_ids)}
