"""Quality benchmark: what users get after a model upgrade, method by method.

    python -m bench.quality --preset smoke|cpu-small|gpu-full --out FILE.json
    python -m bench.quality --preset gpu-full --device cpu --max-users 24 --out FILE.json
    python -m bench.quality --preset cpu-small --shared-lora cost|joint|train \
        [--lora-on target] [--lora-epochs N] --out FILE.json

The second is a rehearsal: the preset's recipe on a seeded sample of its users and another
device, a check that it runs end to end before the machine it is meant for is at hand, not a
measurement.

Every row is scored on the same held-out test interactions of the same users, with a paired
bootstrap interval (over users) of its RMSE minus retraining's. The budget rows pool every
selection seed: which few users are picked moves RMSE as much as the method does, so one seed
would report the draw, not the method. A chart is written next to the JSON. The source prompt set
(the state before the upgrade) is cached between runs. Every rating row reports
``within_user_corr`` (whether it orders a user's own items, not only their level), and
``bias_model`` is the recommender engineer's first baseline, with no LLM.

The third is issue 43's 1+N attempt: what an epoch of a shared LoRA costs on the source or the
target model (``cost``); ``joint`` trains it with every user's prompt and the head, and ``train``
then retrains the prompts on top of it, frozen.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from models import assets, recipe
from models.data import Interaction, Splits, load_interactions, split_chronological
from models.evaluation import Predictions, metrics_of, paired_bootstrap_rmse_diff, predict_set
from models.foundation import FoundationModel
from models.instant import LinearMap, fit_instant, instant_migrate
from models.loop import Examples, ProgressFn, PromptTable, fit, fit_head, index_users
from models.migration import AdapterResult, MigrationConfig, migrate_all, train_adapter
from models.prompts import PromptSet
from models.selection import Selection, SelectionConfig, select_users
from models.tasks import Task, get_task
from models.training import (
    PromptTrainingConfig,
    init_prompts,
    mean_target,
    random_prompts,
    train_prompts,
)


@dataclass(frozen=True)
class Preset:
    name: str
    dataset: str
    task: str
    source_model: str
    target_model: str
    budget: int
    prompt: PromptTrainingConfig  # source training and the retraining baseline
    migration: MigrationConfig  # adapter on all users
    budget_migration: MigrationConfig  # adapter on the budget's users: fewer users, more epochs
    max_users: int | None = None
    n_test: int = 5
    n_val: int = 5
    max_train: int = 30
    seeds: tuple[int, ...] = (0,)  # selection seeds for the budget rows: their spread is reported
    device: str | None = None
    selection: SelectionConfig = field(default_factory=SelectionConfig)  # puma_budget's users


# Every preset runs the measured recipe (models/recipe.py, the service's defaults) and names only
# what its population and hardware change; bench/README.md has the evidence for the recipe.
PRESETS = {
    "smoke": Preset(
        name="smoke",
        dataset="synthetic-tiny",
        task="rating",
        source_model="tiny-llama",
        target_model="tiny-gemma",
        budget=8,
        prompt=PromptTrainingConfig(epochs=6, lr=5e-2, head_lr=1e-2, patience=6),
        # Tiny models on a few users learn only with a wider net, faster rates and more epochs.
        migration=replace(recipe.ALL_USERS, hidden=32, epochs=6, lr=3e-3, head_lr=1e-2, patience=6),
        budget_migration=replace(
            recipe.BUDGET, hidden=32, epochs=10, lr=3e-3, head_lr=1e-2, batch_size=8, patience=10
        ),
        n_test=4,
        n_val=4,
        max_train=16,
        seeds=(0, 1),
        device="cpu",
        selection=recipe.SELECTION,
    ),
    "cpu-small": Preset(
        name="cpu-small",
        dataset="movielens-100k",
        task="rating",
        source_model="smollm2-135m",
        target_model="gemma-3-270m",
        budget=390,
        # Three epochs each: what 2 CPU cores afford for 943 users in the benchmark's hour.
        prompt=PromptTrainingConfig(epochs=3, lr=5e-3, head_lr=3e-3, patience=2, batch_size=32),
        migration=recipe.ALL_USERS,
        budget_migration=recipe.BUDGET,
        seeds=(0, 1, 2),
        selection=recipe.SELECTION,
    ),
    "gpu-full": Preset(
        name="gpu-full",
        dataset="movielens-1m",
        task="rating",
        source_model="smollm2-135m",
        target_model="gemma-3-270m",
        budget=600,
        prompt=PromptTrainingConfig(epochs=8, lr=3e-3, head_lr=2e-3, patience=3, batch_size=64),
        # Not yet run on a GPU: 6,040 users may afford more epochs, kept by validation, and larger
        # batches; the budget's passes stay under 2% of retraining's even at its earliest stop.
        migration=replace(recipe.ALL_USERS, epochs=4, batch_size=64),
        budget_migration=replace(recipe.BUDGET, epochs=2, batch_size=32),
        seeds=(0, 1, 2),
        device="cuda",
        selection=recipe.SELECTION,
    ),
}


def rehearsal(preset: Preset, *, max_users: int | None, device: str | None) -> Preset:
    """``preset`` on a seeded sample of ``max_users`` users and/or on ``device``, renamed so its
    results are never taken for the preset's. The budget is capped at a quarter of the users, so
    that selection still chooses."""
    if max_users is None and device is None:
        return preset
    if max_users is not None and max_users < 8:
        raise ValueError(
            f"A rehearsal needs at least 8 users to split and select, got {max_users}."
        )
    changes: dict[str, Any] = {"name": f"{preset.name}-rehearsal"}
    if max_users is not None:
        changes |= {"max_users": max_users, "budget": min(preset.budget, max_users // 4)}
    if device is not None:
        changes["device"] = device
    return replace(preset, **changes)


@dataclass
class Row:
    method: str
    predictions: Predictions | None
    train_seconds: float
    example_passes: int
    users_trained: int
    extra: dict[str, object] = field(default_factory=dict)
    repeats: int = 1  # times each test interaction is predicted: one per pooled selection seed


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def progress(label: str) -> Callable[[dict[str, float]], None]:
    """A callback that logs every 10% of a training run."""
    shown = [-1]

    def report(state: dict[str, float]) -> None:
        tenth = int(state["fraction"] * 10)
        if tenth > shown[0]:
            shown[0] = tenth
            log(
                f"  {label}: {state['fraction']:.0%} epoch {int(state['epoch'])} loss {state['loss']:.3f}"
            )

    return report


def constant_row(method: str, test: Predictions, values: np.ndarray) -> Row:
    return Row(method, Predictions(test.user_ids, test.targets, values), 0.0, 0, 0)


def baseline_rows(splits: Splits, test: Predictions) -> list[Row]:
    """Non-LLM sanity rows: the global mean rating and each user's own mean rating."""
    labels = splits.train_labels()
    global_mean = float(np.mean([x for v in labels.values() for x in v]))
    per_user = np.array([np.mean(labels[u]) for u in test.user_ids], dtype=np.float32)
    return [
        constant_row("global_mean", test, np.full(len(test.targets), global_mean, np.float32)),
        constant_row("user_mean", test, per_user),
    ]


SHRINKAGE_GRID = (0.0, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0)


@dataclass(frozen=True)
class BiasModel:
    """Global mean + user offsets + item offsets, the ridge solution of the squared error with
    ``user_shrink * sum(b_u^2) + item_shrink * sum(b_i^2)`` (alternating damped means); an
    unseen user or item has offset 0. Predictions are clipped to the rating scale."""

    mean: float
    user: dict[str, float]
    item: dict[str, float]
    user_shrink: float
    item_shrink: float

    @classmethod
    def fit(
        cls,
        train: dict[str, list[Interaction]],
        *,
        user_shrink: float,
        item_shrink: float,
        sweeps: int = 20,
    ) -> BiasModel:
        rated = [i for items in train.values() for i in items]
        if not rated:
            raise ValueError("The bias model needs training interactions.")
        users = sorted({i.user_id for i in rated})
        items = sorted({i.item_id for i in rated})
        u = np.searchsorted(users, [i.user_id for i in rated])
        it = np.searchsorted(items, [i.item_id for i in rated])
        r = np.array([i.label for i in rated], dtype=np.float64)
        mean = float(r.mean())
        n_u = np.bincount(u, minlength=len(users))
        n_i = np.bincount(it, minlength=len(items))
        b_u, b_i = np.zeros(len(users)), np.zeros(len(items))
        for _ in range(sweeps):  # each step is exact for its block: the loss never rises
            b_i = np.bincount(it, weights=r - mean - b_u[u], minlength=len(items)) / (
                n_i + item_shrink
            )
            b_u = np.bincount(u, weights=r - mean - b_i[it], minlength=len(users)) / (
                n_u + user_shrink
            )
        return cls(
            mean,
            dict(zip(users, b_u.tolist(), strict=True)),
            dict(zip(items, b_i.tolist(), strict=True)),
            user_shrink,
            item_shrink,
        )

    def predict(self, part: dict[str, list[Interaction]], labels: tuple[str, ...]) -> np.ndarray:
        """Predictions for every interaction of ``part``, in the order ``Examples.build`` lists
        them."""
        values = [
            self.mean + self.user.get(i.user_id, 0.0) + self.item.get(i.item_id, 0.0)
            for items in part.values()
            for i in items
        ]
        low, high = min(map(float, labels)), max(map(float, labels))
        return np.clip(np.asarray(values, dtype=np.float32), low, high)


def fit_bias_model(splits: Splits, task: Task) -> BiasModel:
    """The bias model whose two shrinkages give the lowest validation RMSE (never the test's)."""
    val = np.array([i.label for items in splits.val.values() for i in items])
    best: tuple[float, BiasModel] | None = None
    for user_shrink in SHRINKAGE_GRID:
        for item_shrink in SHRINKAGE_GRID:
            model = BiasModel.fit(splits.train, user_shrink=user_shrink, item_shrink=item_shrink)
            rmse = float(np.sqrt(np.mean((model.predict(splits.val, task.labels) - val) ** 2)))
            if best is None or rmse < best[0]:
                best = (rmse, model)
    assert best is not None
    return best[1]


def bias_model_row(splits: Splits, task: Task, test: Predictions) -> Row:
    """The first baseline a recommender engineer would try, no LLM: global + user + item
    offsets fit on the training ratings, shrunk toward 0 by amounts chosen on validation."""
    start = time.perf_counter()
    model = fit_bias_model(splits, task)
    values = model.predict(splits.test, task.labels)
    scored = [(i.user_id, i.label) for items in splits.test.values() for i in items]
    if [u for u, _ in scored] != list(test.user_ids) or not np.array_equal(
        np.array([y for _, y in scored], dtype=np.float32), test.targets
    ):
        raise RuntimeError("bias_model would be scored on other interactions than the LLM rows")
    return Row(
        "bias_model",
        Predictions(test.user_ids, test.targets, values),
        time.perf_counter() - start,
        0,
        0,
        {"user_shrink": model.user_shrink, "item_shrink": model.item_shrink},
    )


def source_prompts(
    preset: Preset, model: FoundationModel, task: Task, splits: Splits
) -> tuple[PromptSet, dict]:
    """The source set before the upgrade, trained once and cached by its exact recipe."""
    # The scored tokens are part of the recipe: a set trained to other positions is another set.
    answer = model.answer_tokens(task.template.suffix, task.labels)
    recipe = json.dumps(
        [
            preset.dataset,
            preset.task,
            preset.source_model,
            preset.max_users,
            preset.n_test,
            preset.n_val,
            preset.max_train,
            asdict(preset.prompt),
            task.template.prefix,
            asdict(answer),
        ]
    )
    key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    folder = assets.cache_dir() / "bench"
    path, meta_path = folder / f"source-{key}.safetensors", folder / f"source-{key}.json"
    if path.exists() and meta_path.exists():
        log(f"source prompts from cache {path}")
        return PromptSet.from_bytes(path.read_bytes()), json.loads(meta_path.read_text())
    log(f"training source prompts on {preset.source_model} for {len(splits.users)} users")
    result = train_prompts(
        model, task, splits, config=preset.prompt, on_progress=progress("source")
    )
    meta = {
        "train_seconds": result.seconds,
        "example_passes": result.example_passes,
        "history": result.history,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path.write_bytes(result.prompt_set.to_bytes())
    meta_path.write_text(json.dumps(meta))
    return result.prompt_set, meta


def random_init_row(
    preset: Preset, target: FoundationModel, task: Task, splits: Splits, users: list[str]
) -> Row:
    """Random real-token prompts on the target; only the head is trained, as the adapter's
    warm-up trains it: on the label logits of a sample of examples, computed once."""
    start = time.perf_counter()
    prompts = random_prompts(
        target,
        n_users=len(users),
        prompt_length=preset.prompt.prompt_length,
        seed=preset.prompt.seed + 1,
    )
    table = PromptTable(prompts).to(target.device).requires_grad_(False)
    head = task.make_head(mean_target=mean_target(splits), seed=preset.prompt.seed)
    head = head.to(target.device)
    row_of = index_users(users)
    result = fit_head(
        model=target,
        task=task,
        prompt_source=table,
        head=head,
        train=Examples.build(task, splits.train, row_of=row_of),
        val=Examples.build(task, splits.val, row_of=row_of),
        epochs=max(1, preset.migration.head_warmup_epochs),
        lr=preset.prompt.head_lr,
        batch_size=preset.prompt.batch_size,
        seed=preset.prompt.seed,
        max_examples=preset.migration.head_warmup_examples,
    )
    prompt_set = PromptSet(
        target.name,
        task.name,
        users,
        prompts,
        {k: v.detach().cpu() for k, v in head.state_dict().items()},
    )
    seconds = time.perf_counter() - start
    return Row(
        "random_init",
        predict_set(target, task, prompt_set, splits.test),
        seconds,
        result.example_passes,
        len(users),
    )


def migrate_and_predict(
    *,
    source_set: PromptSet,
    source: FoundationModel,
    target: FoundationModel,
    task: Task,
    splits: Splits,
    selection: Selection,
    config: MigrationConfig,
    vocab_map: LinearMap,
    parts: tuple[dict[str, list[Interaction]], ...],
    on_progress: ProgressFn | None = None,
) -> tuple[AdapterResult, list[Predictions]]:
    """Train the adapter on the selection, map every user, predict the interactions of each of
    ``parts``."""
    result = train_adapter(
        sources=[source_set],
        target=target,
        task=task,
        splits=splits,
        users=selection.users,
        user_weights=selection.weights,
        config=config,
        vocab_maps=[vocab_map],
        source_model=source,
        on_progress=on_progress,
    )
    migrated = migrate_all([source_set], result, target=target.name)
    return result, [predict_set(target, task, migrated, part) for part in parts]


def adapter_row(
    method: str,
    *,
    source_set: PromptSet,
    source: FoundationModel,
    target: FoundationModel,
    task: Task,
    splits: Splits,
    selection: Selection,
    config: MigrationConfig,
    vocab_map: LinearMap,
) -> Row:
    log(f"{method}: training the adapter on {len(selection.users)} users")
    result, [predictions] = migrate_and_predict(
        source_set=source_set,
        source=source,
        target=target,
        task=task,
        splits=splits,
        selection=selection,
        config=config,
        vocab_map=vocab_map,
        parts=(splits.test,),
        on_progress=progress(method),
    )
    return Row(
        method,
        predictions,
        result.seconds,
        result.example_passes,
        result.users_trained,
        {"history": result.history},
    )


def pooled_row(method: str, runs: list[Row], *, task: Task) -> Row:
    """One row for several selection seeds: every run's test predictions together (so RMSE is
    the root of the mean squared error over seeds), cost as the mean of one run."""
    predictions = [r.predictions for r in runs if r.predictions is not None]
    pooled = Predictions(
        user_ids=[u for p in predictions for u in p.user_ids],
        targets=np.concatenate([p.targets for p in predictions]),
        predictions=np.concatenate([p.predictions for p in predictions]),
    )
    per_seed = [metrics_of(task, p)[task.primary_metric] for p in predictions]
    return Row(
        method,
        pooled,
        float(np.mean([r.train_seconds for r in runs])),
        round(float(np.mean([r.example_passes for r in runs]))),
        runs[0].users_trained,
        {
            "seeds": len(runs),
            task.primary_metric + "_per_seed": per_seed,
            "history_per_seed": [r.extra.get("history") for r in runs],
        },
        repeats=len(runs),
    )


def interval_vs_retrain(row: Row, task: Task, retrain: Predictions) -> list[float] | None:
    """95% paired-bootstrap interval of the row's RMSE minus retraining's (rating only)."""
    assert row.predictions is not None
    if task.name != "rating":
        return None
    baseline = np.tile(retrain.predictions, row.repeats)
    if not np.array_equal(row.predictions.targets, np.tile(retrain.targets, row.repeats)):
        raise RuntimeError(f"{row.method} was scored on other interactions than retraining")
    return list(
        paired_bootstrap_rmse_diff(
            user_ids=row.predictions.user_ids,
            targets=row.predictions.targets,
            pred=row.predictions.predictions,
            baseline=baseline,
        )
    )


def row_json(row: Row, task: Task, retrain: Predictions) -> dict[str, object]:
    assert row.predictions is not None
    metrics = metrics_of(task, row.predictions)
    interval = interval_vs_retrain(row, task, retrain)
    return {
        "method": row.method,
        "rmse": metrics.get("rmse"),
        "mae": metrics.get("mae"),
        "auc": metrics.get("auc"),
        "uauc": metrics.get("uauc"),
        "within_user_corr": metrics.get("within_user_corr"),
        "rmse_ci95_vs_retrain": interval,
        "train_seconds": round(row.train_seconds, 2),
        "example_passes": row.example_passes,
        "users_trained": row.users_trained,
    } | row.extra


def preset_splits(preset: Preset) -> Splits:
    """The preset's users, each split chronologically into train / validation / test."""
    interactions = load_interactions(preset.dataset, task=preset.task, max_users=preset.max_users)
    splits = split_chronological(
        interactions, n_test=preset.n_test, n_val=preset.n_val, max_train=preset.max_train
    )
    log(
        f"{preset.dataset}: {len(splits.users)} users, {len(splits.skipped_users)} skipped, "
        f"{sum(map(len, splits.train.values()))} train interactions"
    )
    return splits


def retrain_predictions(rows: list[Row]) -> Predictions | None:
    return next((row.predictions for row in rows if row.method == "retrain"), None)


def keep_row(rows: list[Row], row: Row, *, task: Task) -> None:
    """Keep ``row`` and log what it measured at once: a run cut short still shows its rows, and,
    from retraining on, each row's interval against it (retraining's own logs the earlier rows')."""
    rows.append(row)
    assert row.predictions is not None
    per_seed = row.extra.get(task.primary_metric + "_per_seed")
    seeds = f", per seed {per_seed}" if per_seed else ""
    log(f"{row.method}: {metrics_of(task, row.predictions)}, {row.train_seconds:.0f} s{seeds}")
    retrain = retrain_predictions(rows)
    if retrain is None:
        return
    for kept in rows[:-1] if row.method == "retrain" else [row]:
        interval = interval_vs_retrain(kept, task, retrain)
        if interval is not None:
            log(f"{kept.method}: RMSE - retrain, 95% CI [{interval[0]:+.3f}, {interval[1]:+.3f}]")


def run(preset: Preset) -> dict[str, object]:
    task = get_task(preset.task)
    splits = preset_splits(preset)
    source = FoundationModel.load(preset.source_model, device=preset.device)
    source_set, source_meta = source_prompts(preset, source, task, splits)
    users = source_set.user_ids
    rows: list[Row] = []
    keep = partial(keep_row, rows, task=task)
    source_predictions = predict_set(source, task, source_set, splits.test)
    keep(
        Row(
            "source",
            source_predictions,
            source_meta["train_seconds"],
            source_meta["example_passes"],
            len(users),
        )
    )
    if task.name == "rating":
        keep(bias_model_row(splits, task, source_predictions))
    target = FoundationModel.load(preset.target_model, device=preset.device)
    start = time.perf_counter()
    fitted = fit_instant(
        task,
        sources=[source_set],
        source_models=[source],
        target=target,
        item_texts=splits.train_item_texts(),
        seed=preset.prompt.seed,
    )
    instant = replace(
        instant_migrate([source_set], fitted.maps, target=target.name), head=fitted.head.state
    )
    instant_seconds = time.perf_counter() - start
    vocab_map, head = fitted.maps[0], fitted.head
    # No training: its cost is a fit over the vocabularies and inference passes, reported apart.
    keep(
        Row(
            "instant",
            predict_set(target, task, instant, splits.test),
            0.0,
            0,
            0,
            {
                "fit_seconds": round(instant_seconds, 2),
                "inference_passes": head.passes,
                "shared_tokens": vocab_map.n_shared,
                "map_r2": round(vocab_map.r2, 3),
                "head_r2": round(head.r2, 3),
            },
        )
    )
    keep(random_init_row(preset, target, task, splits, users))
    log("retrain: training every user's prompt on the target")
    retrained = train_prompts(
        target, task, splits, config=preset.prompt, on_progress=progress("retrain")
    )
    keep(
        Row(
            "retrain",
            predict_set(target, task, retrained.prompt_set, splits.test),
            retrained.seconds,
            retrained.example_passes,
            len(users),
            {"history": retrained.history},
        )
    )
    migrated_row = partial(
        adapter_row,
        source_set=source_set,
        source=source,
        target=target,
        task=task,
        splits=splits,
        vocab_map=vocab_map,
    )
    labels = splits.train_labels()
    for method, strategy in (("puma_budget", "puma"), ("random_budget", "random")):
        runs = []
        for seed in preset.seeds:
            chosen = select_users(
                strategy,
                prompts=source_set.prompts,
                labels=labels,
                user_ids=users,
                budget=preset.budget,
                seed=seed,
                config=preset.selection,
            )
            config = replace(preset.budget_migration, seed=seed)
            runs.append(migrated_row(method, selection=chosen, config=config))
        keep(pooled_row(method, runs, task=task))
    # Last: the costliest adapter row, so a run cut short still has the budget's comparisons.
    keep(migrated_row("puma_all", selection=Selection.unweighted(users), config=preset.migration))
    retrain = retrain_predictions(rows)
    assert retrain is not None
    rows = baseline_rows(splits, retrain) + rows
    return {
        "preset": preset.name,
        "dataset": preset.dataset,
        "task": preset.task,
        "source_model": preset.source_model,
        "target_model": preset.target_model,
        "n_users": len(users),
        "skipped_users": len(splits.skipped_users),
        "budget_users": preset.budget,
        "device": str(target.device),
        "dtype": str(target.dtype),
        "rows": [row_json(r, task, retrain) for r in rows],
        "budget_seeds": list(preset.seeds),
        # The recipe each row was trained with, so a result file says what it measured.
        "configs": {
            "prompt": asdict(preset.prompt),
            "migration": asdict(preset.migration),
            "budget_migration": asdict(preset.budget_migration),
            "selection": asdict(preset.selection),
        },
    }


# Issue 43's 1+N attempt: a shared LoRA on the source model (the "1"), trained once on every
# user's training ratings with their prompts and the head, then frozen under retrained prompts.
LORA_TARGETS = ("q_proj", "v_proj")
LORA_LR = 1e-3


def add_shared_lora(model: FoundationModel, *, rank: int = 8, seed: int = 0) -> list[nn.Parameter]:
    """Inject a rank-``rank`` LoRA (peft, the project's dev dependency) on every layer's
    ``LORA_TARGETS``; returns its parameters, the only ones of the model that train. Item
    prefixes already in ``model.prefix_cache`` stay the frozen model's states: the LoRA then
    acts on the user token and the suffix only (the serving path's per-item reuse kept)."""
    from peft import LoraConfig, inject_adapter_in_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=list(LORA_TARGETS), lora_dropout=0.0
        )
        inject_adapter_in_model(config, model.model)
    params = [p for name, p in model.model.named_parameters() if "lora_" in name]
    for param in params:
        param.data = param.data.float()
        param.requires_grad_(True)
    return params


def timed_rows(train: Examples, *, batches: int, batch_size: int, seed: int = 0) -> np.ndarray:
    """The rows ``lora_step_seconds`` trains on: one untimed batch, then ``batches``."""
    return np.random.default_rng(seed).permutation(len(train))[: (batches + 1) * batch_size]


def lora_step_seconds(
    model: FoundationModel,
    task: Task,
    train: Examples,
    *,
    lora: list[nn.Parameter],
    full: bool,
    batches: int,
    batch_size: int,
    seed: int = 0,
) -> float:
    """Seconds per training example of a joint step (prompts, head and ``lora`` if given) over
    ``batches`` random batches after one untimed batch; ``full``: one plain forward over the
    item text too (the LoRA adapts every position, no per-item reuse)."""
    table = PromptTable(
        init_prompts(model, n_users=int(train.users.max()) + 1, config=PromptTrainingConfig())
    ).to(model.device)
    head = task.make_head(mean_target=float(train.targets.mean()), seed=seed).to(model.device)
    groups = [{"params": table.parameters()}, {"params": head.parameters()}]
    optimizer = torch.optim.Adam(groups + ([{"params": lora}] if lora else []), lr=1e-4)
    answer = model.answer_tokens(task.template.suffix, task.labels)
    score = model.label_logits_full if full else model.label_logits
    order = timed_rows(train, batches=batches, batch_size=batch_size, seed=seed)
    start, timed = 0.0, 0
    for step in range(batches + 1):
        if step == 1:
            start, timed = time.perf_counter(), 0
        rows = order[step * batch_size : (step + 1) * batch_size]
        users = torch.from_numpy(train.users[rows]).to(model.device)
        logits = score([train.prefixes[i] for i in rows], table(users), answer=answer)
        targets = torch.from_numpy(train.targets[rows]).to(model.device)
        loss = task.loss(logits, head(logits).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        timed += len(rows)
    return (time.perf_counter() - start) / timed


def shared_lora(
    preset: Preset,
    *,
    mode: Literal["cost", "joint", "train"],
    batches: int,
    on: Literal["source", "target"] = "source",
    epochs: int = 1,
) -> dict[str, object]:
    """What one epoch of a shared LoRA costs on the preset's ``on`` ("source" or "target")
    model, timed against the prompt step (``mode`` "cost"); "joint": then up to ``epochs`` of
    it jointly with every user's prompt and the head, keeping the best validation epoch;
    "train": then also the preset's prompt retraining on top of the frozen LoRA. Each trained
    stage is scored on test like the table's rows."""
    train_it = mode in ("joint", "train")
    task = get_task(preset.task)
    splits = preset_splits(preset)
    model_name = preset.source_model if on == "source" else preset.target_model
    model = FoundationModel.load(model_name, device=preset.device)
    row_of = index_users(splits.users)
    train = Examples.build(task, splits.train, row_of=row_of)
    size = preset.prompt.batch_size
    # Every prefix the run reads, cached before the LoRA is injected: the frozen model's states.
    if train_it:
        texts = [
            t
            for part in (splits.train, splits.val, splits.test)
            for t in Examples.build(task, part, row_of=row_of).prefixes
        ]
    else:
        texts = [train.prefixes[i] for i in timed_rows(train, batches=batches, batch_size=size)]
    log(f"warming {len(set(texts))} item prefixes on the frozen {model_name}")
    model.warm_prefixes(texts)
    cost: dict[str, float] = {}
    lora: list[nn.Parameter] = []
    initial: list[torch.Tensor] = []
    for name, full in (("prompt", False), ("lora_suffix", False), ("lora_full", True)):
        if name == "lora_suffix":
            lora = add_shared_lora(model)
            initial = [param.detach().clone() for param in lora]
        seconds = lora_step_seconds(
            model, task, train, lora=lora, full=full, batches=batches, batch_size=size
        )
        cost[f"{name}_step_s_per_example"] = seconds
        cost[f"{name}_epoch_s"] = round(seconds * len(train), 1)
        log(
            f"{name}: {seconds * 1e3:.1f} ms a step per example, {seconds * len(train):.0f} s an epoch"
        )
    result: dict[str, object] = {
        "preset": preset.name,
        "model": model_name,
        "dtype": str(model.dtype),
        "lora": {
            "rank": 8,
            "alpha": 16,
            "targets": list(LORA_TARGETS),
            "lr": LORA_LR,
            "parameters": sum(p.numel() for p in lora),
        },
        "train_examples": len(train),
        "timed_batches": batches,
        "batch_size": size,
        "cost": cost,
    }
    if not train_it:
        return result
    # The "1": one epoch of the LoRA (suffix positions: the served path keeps per-item reuse),
    # from the adapter as injected, not as the timed steps moved it.
    with torch.no_grad():
        for param, value in zip(lora, initial, strict=True):
            param.copy_(value)
    start = time.perf_counter()
    joint = _train_jointly(preset, model, task, splits, lora, epochs=epochs)
    shared_seconds = time.perf_counter() - start
    for param in lora:
        param.requires_grad_(False)
    result["shared"] = {"train_seconds": round(shared_seconds, 1), "epochs": epochs} | joint
    log(f"shared LoRA with its own prompts: {joint} in {shared_seconds:.0f} s")
    if mode == "joint":
        return result
    # The "N": every user's prompt retrained on top of the frozen LoRA, the preset's recipe.
    retrained = train_prompts(
        model, task, splits, config=preset.prompt, on_progress=progress("prompts on the LoRA")
    )
    test = metrics_of(task, predict_set(model, task, retrained.prompt_set, splits.test))
    log(f"prompts retrained on the frozen LoRA, test: {test} in {retrained.seconds:.0f} s")
    result["retrain_on_lora"] = {
        "train_seconds": round(retrained.seconds, 1),
        "example_passes": retrained.example_passes,
        "history": retrained.history,
        "test": test,
    }
    return result


class _HeadWithLora(nn.Module):
    """The task head, carrying the shared LoRA's parameters (the same tensors, not copies) so
    that ``fit``'s snapshot of the best validation epoch keeps and restores them too."""

    def __init__(self, head: nn.Module, lora: list[nn.Parameter]) -> None:
        super().__init__()
        self.head = head
        self.lora = nn.ParameterList(lora)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.head(logits)


def _train_jointly(
    preset: Preset,
    model: FoundationModel,
    task: Task,
    splits: Splits,
    lora: list[nn.Parameter],
    *,
    epochs: int,
) -> dict[str, object]:
    """Up to ``epochs`` of the LoRA with every user's prompt and the head, the best validation
    epoch kept; its epochs' history and test metrics."""
    users = splits.users
    table = PromptTable(init_prompts(model, n_users=len(users), config=preset.prompt))
    table = table.to(model.device)
    head = task.make_head(mean_target=mean_target(splits), seed=preset.prompt.seed)
    head = head.to(model.device)
    optimizer = torch.optim.Adam(
        [
            {"params": table.parameters(), "lr": preset.prompt.lr},
            {"params": head.parameters(), "lr": preset.prompt.head_lr},
            {"params": lora, "lr": LORA_LR},
        ]
    )
    row_of = index_users(users)
    result = fit(
        model=model,
        task=task,
        prompt_source=table,
        head=_HeadWithLora(head, lora),
        optimizer=optimizer,
        train=Examples.build(task, splits.train, row_of=row_of),
        val=Examples.build(task, splits.val, row_of=row_of),
        epochs=epochs,
        batch_size=preset.prompt.batch_size,
        patience=1,
        seed=preset.prompt.seed,
        on_progress=progress("shared LoRA"),
    )
    prompt_set = PromptSet(
        model.name,
        task.name,
        users,
        table.weight.detach().float().cpu(),
        {k: v.detach().float().cpu() for k, v in head.state_dict().items()},
    )
    test = metrics_of(task, predict_set(model, task, prompt_set, splits.test))
    return {"history": result.history, "best_epoch": result.best_epoch, "test": test}


def write_chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["rmse"] is not None]
    retrain = next(r["rmse"] for r in rows if r["method"] == "retrain")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = [r["method"] for r in rows]
    values = [r["rmse"] for r in rows]
    errors = np.array(
        [
            [
                r["rmse"] - (retrain + r["rmse_ci95_vs_retrain"][0])
                if r["rmse_ci95_vs_retrain"]
                else 0,
                (retrain + r["rmse_ci95_vs_retrain"][1]) - r["rmse"]
                if r["rmse_ci95_vs_retrain"]
                else 0,
            ]
            for r in rows
        ]
    ).T.clip(min=0)
    ax.bar(
        names,
        values,
        yerr=errors,
        capsize=3,
        color=["#888" if n.endswith("mean") or n == "bias_model" else "#3b7" for n in names],
    )
    ax.axhline(retrain, color="k", lw=0.8, ls="--", label="retrain")
    ax.set_ylim(min(values) * 0.95, max(values) * 1.03)
    ax.set_ylabel("test RMSE (lower is better)")
    ax.set_title(
        f"{result['source_model']} -> {result['target_model']}, {result['dataset']}, "
        f"{result['n_users']} users, budget {result['budget_users']}"
    )
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _number(value: float | None, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if value is not None else "-"


def print_table(result: dict) -> None:
    print(
        f"\n{'method':<14} {'rmse':>7} {'mae':>7} {'wu corr':>7} {'ci95 vs retrain':>20} "
        f"{'seconds':>9} {'passes':>8} {'users':>6}"
    )
    for r in result["rows"]:
        ci = r["rmse_ci95_vs_retrain"]
        ci_text = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "-"
        corr = _number(r.get("within_user_corr"), 3)
        print(
            f"{r['method']:<14} {_number(r['rmse']):>7} {_number(r['mae']):>7} {corr:>7} "
            f"{ci_text:>20} {r['train_seconds']:>9.1f} {r['example_passes']:>8} "
            f"{r['users_trained']:>6}"
        )


def markdown_table(result: dict) -> str:
    """The rows as a Markdown table, for the README."""
    lines = [
        "| method | RMSE | MAE | within-user corr | RMSE - retrain, 95% CI | train s "
        "| example passes | users trained |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ci = r["rmse_ci95_vs_retrain"]
        lines.append(
            f"| {r['method']} | {_number(r['rmse'])} | {_number(r['mae'])} | "
            f"{_number(r.get('within_user_corr'), 3)} | "
            f"{f'[{ci[0]:+.3f}, {ci[1]:+.3f}]' if ci else '-'} | {r['train_seconds']:.0f} | "
            f"{r['example_passes']} | {r['users_trained']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--show", type=Path, help="print a saved result as a Markdown table")
    parser.add_argument(
        "--max-users", type=int, help="rehearse the preset on a seeded sample of N users"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), help="rehearse it on this device")
    parser.add_argument(
        "--shared-lora",
        choices=("cost", "joint", "train"),
        help="issue 43's 1+N attempt: time a shared LoRA's epoch (cost), also train it with "
        "every user's prompt (joint), and also retrain the prompts on top of it (train)",
    )
    parser.add_argument("--lora-epochs", type=int, default=1, help="the LoRA's joint epochs")
    parser.add_argument(
        "--lora-on",
        choices=("source", "target"),
        default="source",
        help="the preset's model the shared LoRA adapts",
    )
    parser.add_argument("--timing-batches", type=int, default=6)
    args = parser.parse_args(argv)
    if args.show:
        print(markdown_table(json.loads(args.show.read_text())))
        return
    if args.lora_epochs < 1:
        parser.error("--lora-epochs must be 1 or more")
    if not (args.preset and args.out):
        parser.error("--preset and --out are required to run the benchmark")
    try:
        preset = rehearsal(PRESETS[args.preset], max_users=args.max_users, device=args.device)
    except ValueError as error:
        parser.error(str(error))
    if preset.device == "cuda" and not torch.cuda.is_available():
        sys.exit(
            f"The {preset.name} preset needs a CUDA device and none is visible here: run it "
            "on a GPU machine, or rehearse it with --device cpu --max-users 24."
        )
    start = time.perf_counter()
    if args.shared_lora:
        lora = shared_lora(
            preset,
            mode=args.shared_lora,
            batches=args.timing_batches,
            on=args.lora_on,
            epochs=args.lora_epochs,
        )
        lora["wall_seconds"] = round(time.perf_counter() - start, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(lora, indent=2))
        log(f"wrote {args.out}")
        return
    result = run(preset)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    write_chart(result, args.out.with_suffix(".png"))
    print_table(result)
    log(f"wrote {args.out} and {args.out.with_suffix('.png')} in {result['wall_seconds']}s")


if __name__ == "__main__":
    main()
