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

from models.adapter import AdapterConfig, FoldedAdapter, PumaAdapter, fold
from models.adapter.model import AdapterPrompts
from models.data import Splits
from models.distill import blend_targets, source_predictions
from models.errors import DataError, ShapeMismatchError
from models.foundation import FoundationModel
from models.instant import LinearMap, stacked_map
from models.loop import Examples, FitResult, ProgressFn, StopFn, fit, fit_head, index_users
from models.prompts import PromptSet
from models.tasks import Task


@dataclass(frozen=True)
class MigrationConfig:
    """How the adapter trains. The defaults are the paper's reference method, scaled to small
    models; models/recipe.py holds the measured recipe the service and the benchmark run."""

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
    # Start the adapter's linear path at the instant map (needs vocab_maps) instead of at zero:
    # the map scores below the global mean, and few users cannot undo that for the rest.
    start_from_vocab_map: bool = False
    # Centre and scale inputs by every source user's prompt (free: no LM pass), so the adapter sees
    # how users differ, not the start they share, at unit scale whatever the source model.
    standardize_inputs: bool = True
    # Top principal directions of the source table the adapter reads (None: every feature): fewer
    # inputs for an adapter fitted on few users; ``fitted_rank`` caps it at what the table has.
    input_rank: int | None = None
    # Train on each user's latest N interactions only (None: all of them). A budget pays for LM
    # passes: a cap buys more distinct users for the same passes, each one more point of the map.
    max_train_per_user: int | None = None
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
            raise ValueError(
                "MigrationConfig.input_rank needs standardize_inputs=True: the "
                "principal directions come from the source table's statistics."
            )
        if self.max_train_per_user is not None and self.max_train_per_user < 1:
            raise ValueError(
                "MigrationConfig.max_train_per_user must be >= 1, or None for every "
                "training interaction."
            )
        if self.head_warmup_examples < 1:
            raise ValueError("MigrationConfig.head_warmup_examples must be >= 1.")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(
                "MigrationConfig.distill_weight must lie in [0, 1]: the source "
                "prediction's share of each training target (0: labels alone)."
            )


def fitted_rank(rank: int, *, prompt_vectors: int, features: int) -> int:
    """``rank`` principal directions, or as many as a table of ``prompt_vectors`` rows of
    ``features`` has: a centred table of n rows spans at most n - 1 directions."""
    return max(1, min(rank, features, prompt_vectors - 1))


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
    statistics: list[PromptSet] | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> AdapterResult:
    """Train the adapter on ``users`` (their source prompts and interactions), each user's
    examples weighted in the loss by ``user_weights`` (``Selection.weights``; None: alike).
    ``source_model``: the first source's model, needed when ``config.distill_weight`` > 0.
    ``statistics``: the sets whose every common user gives the input statistics (a sample of
    the population the adapter will map); None: ``sources``."""
    if not users:
        raise DataError("No users to train the adapter on: select at least one user.")
    splits.require_training_data(users)
    inputs = stack_sources(sources, users)
    # Every user's prompt gives the input statistics; input_rank implies standardize_inputs.
    table_sets = sources if statistics is None else statistics
    table = (
        stack_sources(table_sets, common_users(table_sets)) if config.standardize_inputs else None
    )
    rank = config.input_rank
    if rank is not None and table is not None:  # a small table has fewer directions than asked
        rank = fitted_rank(
            rank, prompt_vectors=table.shape[0] * table.shape[1], features=inputs.shape[-1]
        )
    torch.manual_seed(config.seed)  # before the adapter's weights: a run reproduces from its seed
    adapter = PumaAdapter(
        AdapterConfig(
            d_in=inputs.shape[-1],
            d_out=target.hidden_size,
            hidden=config.hidden,
            dropout=config.dropout,
            out_std=target.embedding_std,
            input_rank=rank,
        )
    )
    if table is not None:
        adapter.set_input_statistics(table)
    if vocab_maps and config.start_from_vocab_map:
        linear = stacked_map(vocab_maps)
        adapter.init_skip(linear.weight, linear.offset)
    source = AdapterPrompts(adapter, inputs).to(target.device)
    head = task.load_head(sources[0].head).to(target.device)
    row_of = index_users(users)
    train = Examples.build(
        task,
        splits.latest_train(config.max_train_per_user),
        row_of=row_of,
        user_weights=user_weights,
    )
    val = Examples.build(task, splits.val, row_of=row_of)
    phases: list[FitResult] = []
    if config.distill_weight:
        if source_model is None:
            raise ValueError(
                "MigrationConfig.distill_weight > 0 blends labels with the source "
                "model's predictions: pass source_model, or set distill_weight=0."
            )
        predicted = source_predictions(
            model=source_model, task=task, source=sources[0], users=users, examples=train
        )
        phases.append(predicted.cost)
        train = blend_targets(train, predicted, task=task, weight=config.distill_weight)
    if config.head_warmup_epochs:
        warmup = fit_head(
            model=target,
            task=task,
            prompt_source=source,
            head=head,
            train=train,
            val=val,
            epochs=config.head_warmup_epochs,
            lr=config.head_lr,
            batch_size=config.batch_size,
            seed=config.seed,
            max_examples=config.head_warmup_examples,
        )
        warmup.history = [record | {"head_only": 1.0} for record in warmup.history]
        phases.append(warmup)
    optimizer = torch.optim.AdamW(
        [
            {"params": adapter.parameters(), "lr": config.lr, "weight_decay": config.weight_decay},
            {"params": head.parameters(), "lr": config.head_lr, "weight_decay": 0.0},
        ]
    )
    phases.append(
        fit(
            model=target,
            task=task,
            prompt_source=source,
            head=head,
            train=train,
            val=val,
            optimizer=optimizer,
            epochs=config.epochs,
            batch_size=config.batch_size,
            patience=config.patience,
            seed=config.seed,
            on_progress=on_progress,
            should_stop=should_stop,
        )
    )
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
    adapter: PumaAdapter | FoldedAdapter, source_prompts: torch.Tensor, *, batch_size: int = 256
) -> torch.Tensor:
    """``[n, l, d_in]`` -> ``[n, l, d_out]`` fp32 on CPU, in batches, through the adapter's folded
    form (``models.adapter.fold``; pass one to map many batches without folding each time)."""
    mapping = fold(adapter) if isinstance(adapter, PumaAdapter) else adapter
    device = next(mapping.parameters()).device
    chunks = [
        mapping(source_prompts[i : i + batch_size].float().to(device)).cpu()
        for i in range(0, len(source_prompts), batch_size)
    ]
    return torch.cat(chunks) if chunks else source_prompts.new_zeros((0, 0, adapter.config.d_out))


def migrate_all(
    sources: list[PromptSet], result: AdapterResult, *, target: str, users: list[str] | None = None
) -> PromptSet:
    """Every common user of the sources (or ``users``) mapped through the trained adapter."""
    users = users or common_users(sources)
    mapped = map_prompts(result.adapter, stack_sources(sources, users))
    return PromptSet(target, sources[0].task, list(users), mapped, dict(result.head))
