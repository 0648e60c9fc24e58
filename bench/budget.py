"""Budget study: pick the budget adapter's configuration without reading the test split.

    python -m bench.budget --preset cpu-small --budgets 80:2,130:1,80:2:16 --strategies puma \\
        --seeds 0,1,2 --out bench/results/budget-epochs-cpu-small.json

With ``--base migration --strategies all`` the same study tunes the adapter on all users.

For each variant of the preset's budget adapter (its ``input_rank``, its learning rate, the number
of users with the epoch cap, and optionally the batch size and a cap on each user's training
interactions: ``80:2`` trains 80 users for at most 2 epochs, about the LM passes of ``40:4``;
``80:2:16`` does so in batches of 16; ``260:1:8:15`` trains 260 users on their latest 15
interactions each), any other fields given with ``--set`` (``--set dropout=0.3,weight_decay=0.1
--set start_from_vocab_map=false`` is two variants), each variant of puma's selection
(``--selection floor_share=0.375``; random users are drawn once per seed, and only where
``--selection preset`` or no ``--selection`` is given), each selection strategy and each seed:
select the budget's users, train the adapter on them, map every user and score the VALIDATION
ratings of every user, and of the users not selected (whom the adapter never saw).
Test ratings are never read, so a choice made here leaves the quality benchmark's test figures
unbiased. Reference rows on the same validation ratings: each user's mean training rating and the
source prompts on the source model. The source set comes from the quality benchmark's cache.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable, Set
from dataclasses import asdict, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from bench.quality import (
    PRESETS,
    Preset,
    baseline_rows,
    log,
    migrate_and_predict,
    preset_splits,
    source_prompts,
)
from models.evaluation import Predictions, metrics_of, predict_set
from models.foundation import FoundationModel
from models.instant import fit_vocab_map
from models.migration import MigrationConfig
from models.selection import SelectionConfig, select_users
from models.tasks import Task, get_task


class Budget(NamedTuple):
    users: int
    epochs: int  # the cap: the best validation epoch is kept
    batch_size: int | None = None  # None: the base configuration's
    per_user: int | None = None  # latest training interactions per user; None: the base's


def rmse(task: Task, predictions: Predictions, *, without: Set[str] = frozenset()) -> float:
    """The task's RMSE over the predictions of users not in ``without``."""
    keep = np.array([u not in without for u in predictions.user_ids])
    kept = Predictions(
        [u for u, k in zip(predictions.user_ids, keep, strict=True) if k],
        predictions.targets[keep],
        predictions.predictions[keep],
    )
    return float(metrics_of(task, kept)["rmse"] or 0.0)


def run(
    preset: Preset,
    *,
    input_ranks: list[int | None],
    lrs: list[float | None],
    budgets: list[Budget],
    strategies: list[str],
    seeds: list[int],
    base: str = "budget_migration",
    settings: list[dict[str, Any]] | None = None,
    selections: list[dict[str, Any]] | None = None,
    adapter_seeds: list[int] | None = None,
    on_run: Callable[[dict[str, object]], None] | None = None,
) -> dict[str, object]:
    """The study's result; ``on_run`` gets the result so far after every run, so a study cut
    short still leaves the runs it finished."""
    if preset.task != "rating":
        raise SystemExit("The budget study scores RMSE: use a preset of the rating task.")
    task = get_task(preset.task)
    splits = preset_splits(preset)
    source = FoundationModel.load(preset.source_model, device=preset.device)
    source_set, _ = source_prompts(preset, source, task, splits)
    users = source_set.user_ids
    source_val = predict_set(source, task, source_set, splits.val)
    user_mean = next(r for r in baseline_rows(splits, source_val) if r.method == "user_mean")
    assert user_mean.predictions is not None
    reference = {"user_mean": rmse(task, user_mean.predictions), "source": rmse(task, source_val)}
    log(f"validation reference: {reference}")
    target = FoundationModel.load(preset.target_model, device=preset.device)
    vocab_map = fit_vocab_map(source, target)
    labels = splits.train_labels()
    base_config: MigrationConfig = getattr(preset, base)
    runs: list[dict[str, Any]] = []

    def study() -> dict[str, object]:
        return {
            "preset": preset.name,
            "split": "validation",
            "dataset": preset.dataset,
            "source_model": preset.source_model,
            "target_model": preset.target_model,
            "n_users": len(users),
            "base": base,
            "reference": reference,
            "summary": summarise(runs),
            "runs": runs,
        }

    # Seeds outermost: a study cut short holds every variant on the same seeds.
    # An adapter seed apart from the selection seed tells the users' share of the spread from the
    # adapter's own (its initial weights and the order it sees examples in).
    same_as_selection: list[int | None] = [None]
    grid = itertools.product(
        seeds,
        adapter_seeds or same_as_selection,
        selections or [{}],
        settings or [{}],
        input_ranks,
        lrs,
        budgets,
        strategies,
    )
    for seed, adapter_seed, picking, setting, rank, lr, spec, strategy in grid:
        budget, epochs, batch, per_user = spec
        if picking and strategy != "puma":
            continue  # the selection options change puma's users only
        chosen = select_users(
            strategy,
            prompts=source_set.prompts,
            labels=labels,
            user_ids=users,
            budget=budget,
            seed=seed,
            config=replace(preset.selection, **picking),
        )
        given: dict[str, Any] = {"lr": lr, "batch_size": batch, "max_train_per_user": per_user}
        config = replace(
            base_config,
            input_rank=rank,
            epochs=epochs,
            seed=seed if adapter_seed is None else adapter_seed,
            **{k: v for k, v in given.items() if v is not None},
            **setting,
        )
        result, [val] = migrate_and_predict(
            source_set=source_set,
            source=source,
            target=target,
            task=task,
            splits=splits,
            selection=chosen,
            config=config,
            vocab_map=vocab_map,
            parts=(splits.val,),
        )
        runs.append(
            {
                "selection": setting_text(picking),
                "set": setting_text(setting),
                "input_rank": rank,
                "lr": config.lr,
                "budget": budget,
                "epochs": epochs,
                "batch_size": config.batch_size,
                "max_train_per_user": config.max_train_per_user,
                "strategy": strategy,
                "seed": seed,
                "adapter_seed": config.seed,
                "val_rmse": rmse(task, val),
                "val_rmse_unselected": (
                    rmse(task, val, without=set(chosen.users))
                    if len(chosen.users) < len(users)
                    else None
                ),
                "train_seconds": round(result.seconds, 1),
                "example_passes": result.example_passes,
                "config": asdict(config),
                "history": result.history,
            }
        )
        log(
            f"{variant(runs[-1])} seed {seed} adapter seed {config.seed}: validation RMSE {runs[-1]['val_rmse']:.4f}, "
            f"unselected {runs[-1]['val_rmse_unselected']}, "
            f"{result.seconds:.0f}s"
        )
        if on_run is not None:
            on_run(study())
    return study()


def variant(row: dict) -> str:
    """A run's or a summary row's variant, as the log and the summary print it."""
    budget = f"{row['budget']}:{row['epochs']}:{row['batch_size']}:{row['max_train_per_user']}"
    picking = f"selection {row['selection']} " if row.get("selection") else ""
    return (
        f"{picking}{row['set'] or 'preset'} input_rank {row['input_rank']!s:>5} lr {row['lr']:g} "
        f"budget {budget} {row['strategy']:<7}"
    )


def summarise(runs: list[dict]) -> list[dict[str, object]]:
    """Mean validation RMSE and cost of each variant and strategy over its seeds."""
    keys = (
        "selection",
        "set",
        "input_rank",
        "lr",
        "budget",
        "epochs",
        "batch_size",
        "max_train_per_user",
        "strategy",
    )
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return [
        dict(zip(keys, key, strict=True))
        | {
            "val_rmse_mean": float(np.mean([r["val_rmse"] for r in group])),
            "val_rmse_per_seed": [r["val_rmse"] for r in group],
            "val_rmse_unselected_mean": mean_or_none([r["val_rmse_unselected"] for r in group]),
            "train_seconds_mean": float(np.mean([r["train_seconds"] for r in group])),
            "example_passes_mean": float(np.mean([r["example_passes"] for r in group])),
        }
        for key, group in groups.items()
    ]


def mean_or_none(values: list[float | None]) -> float | None:
    """None when a variant selected every user: no one is left unseen by its adapter."""
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def parse_rank(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def parse_lr(text: str) -> float | None:
    """A positive learning rate, or None for ``preset`` (the preset's own)."""
    if text.lower() == "preset":
        return None
    message = f"learning rate {text!r}: write a positive number such as 1e-3, or 'preset'"
    try:
        lr = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(message) from None
    if not 0 < lr < float("inf"):
        raise argparse.ArgumentTypeError(message)
    return lr


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds {text!r}: write integers such as 0,1,2") from None


def parse_lrs(text: str) -> list[float | None]:
    return [parse_lr(item) for item in text.split(",")]


# Fields the study varies with their own options, or per seed.
SET_ELSEWHERE = frozenset(
    {"input_rank", "lr", "epochs", "batch_size", "max_train_per_user", "seed"}
)


def parse_setting(text: str, config_type: type = MigrationConfig) -> dict[str, Any]:
    """``"dropout=0.3,start_from_vocab_map=false"`` -> those fields of the base configuration,
    converted to the fields' types; ``"preset"`` -> no change."""
    if text.lower() == "preset":
        return {}
    types = {f.name: f.type for f in fields(config_type) if f.name not in SET_ELSEWHERE}
    setting: dict[str, Any] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or name not in types:
            raise argparse.ArgumentTypeError(
                f"setting {item!r}: write FIELD=VALUE with FIELD one of {', '.join(types)}"
            )
        setting[name] = parse_value(name, str(types[name]), value)
    try:  # the configuration's own checks, before minutes of reference predictions
        replace(config_type(), **setting)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"setting {text!r}: {error}") from None
    return setting


def parse_value(name: str, type_name: str, value: str) -> bool | int | float | str | None:
    """A value of the type a configuration field is annotated with."""
    try:
        if value.lower() == "none" and "None" in type_name:
            return None
        if type_name.startswith("Literal"):
            return value  # the configuration's own check names the choices
        if type_name.startswith("bool"):
            if value.lower() not in ("true", "false"):
                raise ValueError
            return value.lower() == "true"
        return int(value) if type_name.startswith("int") else float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"setting {name}={value!r}: expected a value of type {type_name}"
        ) from None


def setting_text(setting: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in setting.items())


def parse_budgets(text: str) -> list[Budget]:
    """``"40:4,80:2:16,260:1:8:15"`` -> [40 users for at most 4 epochs, 80 for 2 in batches of
    16, 260 for 1 in batches of 8 on their latest 15 interactions each]."""
    budgets = []
    for item in text.split(","):
        parts = item.split(":")
        if not (2 <= len(parts) <= 4 and all(p.isdigit() and int(p) > 0 for p in parts)):
            raise argparse.ArgumentTypeError(
                f"budget {item!r}: write USERS:EPOCHS, USERS:EPOCHS:BATCH or "
                "USERS:EPOCHS:BATCH:PER_USER with positive integers, e.g. 80:2, 80:2:16 or "
                "260:1:8:15"
            )
        budgets.append(Budget(*map(int, parts)))
    return budgets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument(
        "--input-ranks",
        default=None,
        help="comma-separated; 'none': every feature; default: the preset's",
    )
    parser.add_argument(
        "--lrs",
        type=parse_lrs,
        default=[None],
        help="comma-separated adapter learning rates; 'preset': the preset's",
    )
    parser.add_argument(
        "--budgets",
        type=parse_budgets,
        default=None,
        help="comma-separated USERS:EPOCHS[:BATCH[:PER_USER]]; default: the preset's",
    )
    parser.add_argument(
        "--set",
        dest="settings",
        type=parse_setting,
        action="append",
        help="a variant of the base configuration, FIELD=VALUE[,FIELD=VALUE]; "
        "repeat for more variants, 'preset' for the base itself",
    )
    parser.add_argument(
        "--selection",
        dest="selections",
        action="append",
        type=partial(parse_setting, config_type=SelectionConfig),
        help="a variant of the preset's puma selection, FIELD=VALUE[,FIELD=VALUE] "
        "(e.g. floor_share=0.375,variance_weighting=uniform); repeat for "
        "more variants, 'preset' for the preset's own (random users run "
        "only with that one)",
    )
    parser.add_argument("--strategies", default="puma,random")
    parser.add_argument(
        "--seeds", type=parse_seeds, default=None, help="comma-separated; default: the preset's"
    )
    parser.add_argument(
        "--adapter-seeds",
        type=parse_seeds,
        default=None,
        help="comma-separated seeds of the adapter's initial weights and example "
        "order, each run with every selection seed; default: the selection "
        "seed",
    )
    parser.add_argument(
        "--base",
        choices=("budget_migration", "migration"),
        default="budget_migration",
        help="the preset's adapter the variants start from: the budget's, or the "
        "one on all users (with --strategies all)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    seeds = args.seeds or list(preset.seeds)
    base = getattr(preset, args.base)
    budgets = args.budgets or [Budget(preset.budget, base.epochs)]
    ranks = (
        [parse_rank(r) for r in args.input_ranks.split(",")]
        if args.input_ranks
        else [base.input_rank]
    )
    start = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write(result: dict[str, object], *, complete: bool) -> None:
        wall = round(time.perf_counter() - start, 1)
        args.out.write_text(
            json.dumps(result | {"complete": complete, "wall_seconds": wall}, indent=2)
        )

    result = run(
        preset,
        input_ranks=ranks,
        lrs=args.lrs,
        budgets=budgets,
        strategies=args.strategies.split(","),
        seeds=seeds,
        base=args.base,
        settings=args.settings,
        selections=args.selections,
        adapter_seeds=args.adapter_seeds,
        on_run=partial(write, complete=False),
    )
    write(result, complete=True)
    print(f"\nvalidation RMSE: {result['reference']}")
    for row in result["summary"]:  # type: ignore[attr-defined]
        seeds_text = ", ".join(f"{v:.4f}" for v in row["val_rmse_per_seed"])
        print(
            f"{variant(row)} {row['train_seconds_mean']:.0f}s "
            f"mean {row['val_rmse_mean']:.4f} [{seeds_text}] "
            f"unselected {row['val_rmse_unselected_mean']}"
        )
    log(f"wrote {args.out} in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
