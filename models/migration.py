"""PUMA migration: train one adapter through the frozen target model, then map every user.

Source prompts stay frozen, the target LM stays frozen; the adapter and the task head (started
from the first source's head) learn on the target's task loss over the selected users, whose
labels can be blended with the first source's own predictions (``distill_weight``). The best
epoch is chosen on those users' validation split (real labels). Chained migration is a migrated
set used as the next source; aggregated migration concatenates several sources' prompts along the
features.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from models.adapter import AdapterConfig, PumaAdapter
from models.adapter.model import AdapterPrompts
from models.data import Splits
from models.distill import blend_targets, source_predictions
from models.errors import DataError, ShapeMismatchError
from models.foundation import FoundationModel
from models.instant import LinearMap, stacked_map
from models.loop import Examples, FitResult, ProgressFn, StopFn, fit, fit_head, index_users
from models.mean_start import start_from_user_means
from models.prompts import PromptSet
from models.tasks import Task


@dataclass(frozen=True)
class MigrationConfig:
    hidden: int = 256  # adapter FFN width (the paper's 4096 is for 2-3B models)
    epochs: int = 4
    lr: float = 5e-4  # the adapter's; the reference uses 1e-4 for a 30x larger adapter
    head_lr: float = 1e-3
    # Label logits differ in scale across models: fit the head first, on logits computed once
    # (epochs over them cost no LM pass) for a sample of the users' examples.
    head_warmup_epochs: int = 10
    head_warmup_examples: int = 2048
    batch_size: int = 32
    weight_decay: float = 0.01
    dropout: float = 0.1
    patience: int = 2
    # Start the adapter's linear path at the instant map (needs vocab_maps) instead of at zero. On
    # cpu-small's budget of 260 users zero scored better on validation, 1.1430 against 1.1572.
    start_from_vocab_map: bool = False
    # Start the linear path at each user's mean training label as the source prompt predicts it
    # (models/mean_start.py): a ridge fit on the selected users' labels (no LM pass) and the
    # target's mean gradient over mean_start_examples of their examples (one pass each). On
    # cpu-small it scored level with the zero start after training (bench/README.md).
    start_from_user_means: bool = False
    mean_start_examples: int = 128
    # Centre and scale inputs by every source user's prompt (free: no LM pass), so the adapter sees
    # how users differ, not the start they share, at unit scale whatever the source model.
    standardize_inputs: bool = True
    # Top principal directions of the source table the adapter reads (None: every feature).
    # Fewer inputs help a budget adapter only with enough users to fit them (bench/README.md).
    input_rank: int | None = None
    # The adapter's linear path alone, without the residual network (AdapterConfig.linear_only).
    linear_only: bool = False
    # Train on each user's latest N interactions only (None: all of them). LM passes are what a
    # budget costs, and each user is one point of the map the adapter learns: a cap buys more
    # distinct users for the same passes, and the latest interactions sit closest to what the
    # migrated prompt will be asked next. On cpu-small it scored level with no cap (bench/README.md).
    max_train_per_user: int | None = None
    # Keep the average of the adapter's and head's weights over this last fraction of training
    # steps instead of the last step's (None: the last step's). Free of LM passes; meant to damp
    # how far one short run's end point moves with its seed.
    average_last: float | None = None
    # Blend each training label with the source set's own prediction of it on the source model
    # (models/distill.py), this share of the source's (0: labels alone, as in the paper). Needs the
    # source model at training time; costs one source-model inference pass per training example.
    distill_weight: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden", "epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"MigrationConfig.{name} must be >= 1.")
        if self.head_warmup_epochs < 0:
            raise ValueError("MigrationConfig.head_warmup_epochs must be >= 0 (0: no warm-up).")
        if self.input_rank is not None and self.input_rank < 1:
            raise ValueError("MigrationConfig.input_rank must be >= 1, or None for every feature.")
        if self.input_rank is not None and not self.standardize_inputs:
            raise ValueError("MigrationConfig.input_rank needs standardize_inputs=True: the "
                             "principal directions come from the source table's statistics.")  # fmt: skip
        if self.max_train_per_user is not None and self.max_train_per_user < 1:
            raise ValueError("MigrationConfig.max_train_per_user must be >= 1, or None for every "
                             "training interaction.")  # fmt: skip
        if self.average_last is not None and not 0 < self.average_last <= 1:
            raise ValueError("MigrationConfig.average_last must lie in (0, 1], the last fraction "
                             "of training steps to average, or be None.")  # fmt: skip
        if self.start_from_user_means and self.start_from_vocab_map:
            raise ValueError("MigrationConfig: start_from_user_means and start_from_vocab_map both "
                             "set the linear path's start: choose one.")  # fmt: skip
        if self.mean_start_examples < 1:
            raise ValueError("MigrationConfig.mean_start_examples must be >= 1.")
        if self.head_warmup_examples < 1:
            raise ValueError("MigrationConfig.head_warmup_examples must be >= 1.")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError("MigrationConfig.distill_weight must lie in [0, 1]: the source "
                             "prediction's share of each training target (0: labels alone).")  # fmt: skip


@dataclass
class AdapterResult:
    adapter: PumaAdapter
    head: dict[str, torch.Tensor]
    seconds: float
    example_passes: int
    users_trained: int
    history: list[dict[str, float]] = field(default_factory=list)


def stack_sources(sources: list[PromptSet], user_ids: list[str]) -> torch.Tensor:
    """Prompts of ``user_ids`` from every source, concatenated on features: ``[n, l, sum d]``."""
    if not sources:
        raise DataError("A migration needs at least one source prompt set.")
    lengths = {s.prompt_length for s in sources}
    if len(lengths) != 1:
        raise ShapeMismatchError(
            f"Sources have prompt lengths {sorted(lengths)}: aggregate only sets of the same l."
        )
    tasks = {s.task for s in sources}
    if len(tasks) != 1:
        raise DataError(f"Sources were trained for different tasks {sorted(tasks)}.")
    return torch.cat([s.rows(user_ids) for s in sources], dim=-1)


def common_users(sources: list[PromptSet]) -> list[str]:
    """Users present in every source, in the first source's order."""
    shared = set.intersection(*(set(s.user_ids) for s in sources))
    return [u for u in sources[0].user_ids if u in shared]


def train_adapter(
    *,
    sources: list[PromptSet],
    target: FoundationModel,
    task: Task,
    splits: Splits,
    users: list[str],
    config: MigrationConfig,
    vocab_maps: list[LinearMap] | None = None,
    source_model: FoundationModel | None = None,
    user_weights: Mapping[str, float] | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> AdapterResult:
    """Train the adapter on ``users`` (their source prompts and interactions), each user's
    examples weighted in the loss by ``user_weights`` (``Selection.weights``; None: alike).
    ``source_model``: the first source's model, needed when ``config.distill_weight`` > 0."""
    if not users:
        raise DataError("No users to train the adapter on: select at least one user.")
    splits.require_training_data(users)
    inputs = stack_sources(sources, users)
    # Every user's prompt gives the input statistics; input_rank implies standardize_inputs.
    table = stack_sources(sources, common_users(sources)) if config.standardize_inputs else None
    rank = config.input_rank
    if rank is not None and table is not None:  # a small table has fewer directions than asked
        rank = max(1, min(rank, inputs.shape[-1], table.shape[0] * table.shape[1] - 1))
    torch.manual_seed(config.seed)  # before the adapter's weights: a run reproduces from its seed
    adapter = PumaAdapter(AdapterConfig(
        d_in=inputs.shape[-1], d_out=target.hidden_size, hidden=config.hidden,
        dropout=config.dropout, out_std=target.embedding_std, input_rank=rank,
        linear_only=config.linear_only,
    ))  # fmt: skip
    if table is not None:
        adapter.set_input_statistics(table)
    if vocab_maps and config.start_from_vocab_map:
        linear = stacked_map(vocab_maps)
        adapter.init_skip(linear.weight, linear.offset)
    source = AdapterPrompts(adapter, inputs).to(target.device)
    head = task.load_head(sources[0].head).to(target.device)
    row_of = index_users(users)
    train = Examples.build(task, splits.latest_train(config.max_train_per_user), row_of=row_of,
                           user_weights=user_weights)  # fmt: skip
    val = Examples.build(task, splits.val, row_of=row_of)
    phases: list[FitResult] = []
    if config.distill_weight:
        if source_model is None:
            raise ValueError("MigrationConfig.distill_weight > 0 blends labels with the source "
                             "model's predictions: pass source_model, or set distill_weight=0.")  # fmt: skip
        predicted = source_predictions(
            model=source_model, task=task, source=sources[0], users=users, examples=train
        )
        phases.append(predicted.cost)
        train = blend_targets(train, predicted, task=task, weight=config.distill_weight)
    if config.head_warmup_epochs:
        warmup = fit_head(
            model=target, task=task, prompt_source=source, head=head, train=train, val=val,
            epochs=config.head_warmup_epochs, lr=config.head_lr, batch_size=config.batch_size,
            seed=config.seed, max_examples=config.head_warmup_examples,
        )  # fmt: skip
        warmup.history = [record | {"head_only": 1.0} for record in warmup.history]
        phases.append(warmup)
    if config.start_from_user_means:  # after the warm-up: the gradient is the fitted head's
        phases.append(start_from_user_means(
            adapter=adapter, prompt_source=source, users=users, labels=splits.train_labels(),
            train=train, model=target, task=task, head=head,
            n_examples=config.mean_start_examples, batch_size=config.batch_size, seed=config.seed,
        ))  # fmt: skip
    optimizer = torch.optim.AdamW(
        [{"params": adapter.parameters(), "lr": config.lr, "weight_decay": config.weight_decay},
         {"params": head.parameters(), "lr": config.head_lr, "weight_decay": 0.0}]
    )  # fmt: skip
    phases.append(fit(
        model=target, task=task, prompt_source=source, head=head, train=train, val=val,
        optimizer=optimizer, epochs=config.epochs, batch_size=config.batch_size,
        patience=config.patience, seed=config.seed, average_last=config.average_last,
        on_progress=on_progress,
        should_stop=should_stop,
    ))  # fmt: skip
    return AdapterResult(
        adapter=adapter.cpu().eval(),
        head={k: v.detach().float().cpu() for k, v in head.state_dict().items()},
        seconds=sum(p.seconds for p in phases),
        example_passes=sum(p.example_passes for p in phases),
        users_trained=len(users),
        history=[h for p in phases for h in p.history],
    )


@torch.no_grad()
def map_prompts(
    adapter: PumaAdapter, source_prompts: torch.Tensor, *, batch_size: int = 256
) -> torch.Tensor:
    """``[n, l, d_in]`` -> ``[n, l, d_out]`` fp32 on CPU, in batches."""
    adapter = adapter.eval()
    device = next(adapter.parameters()).device
    chunks = [adapter(source_prompts[i : i + batch_size].float().to(device)).cpu()
              for i in range(0, len(source_prompts), batch_size)]  # fmt: skip
    return torch.cat(chunks) if chunks else source_prompts.new_zeros((0, 0, adapter.config.d_out))


def migrate_all(
    sources: list[PromptSet], result: AdapterResult, *, target: str, users: list[str] | None = None
) -> PromptSet:
    """Every common user of the sources (or ``users``) mapped through the trained adapter."""
    users = users or common_users(sources)
    mapped = map_prompts(result.adapter, stack_sources(sources, users))
    return PromptSet(target, sources[0].task, list(users), mapped, dict(result.head))
