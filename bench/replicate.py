"""Replicate the quality benchmark's budget adapters in a fresh process, on validation and test.

    python -m bench.replicate --preset cpu-small --seed 0 --out FILE.json

A diagnostic of the benchmark, not a tuning tool: it reads the test split, so nothing may be
chosen from it. For one selection seed it trains the budget adapter on puma's users under the
preset's selection and under the reference's, and on random users, with the benchmark's recipe,
and scores every user on validation and on test. Each row gives RMSE, the mean prediction against
the mean rating (a shift between the splits that favours one adapter would show there) and RMSE
with that bias removed. The source set comes from the quality benchmark's cache.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.quality import PRESETS, log, migrate_and_predict, preset_splits, source_prompts
from models.evaluation import Predictions, metrics_of
from models.foundation import FoundationModel
from models.instant import fit_instant
from models.selection import SelectionConfig, select_users
from models.tasks import Task, get_task


def error_summary(task: Task, predictions: Predictions) -> dict[str, float | None]:
    errors = predictions.predictions - predictions.targets
    return {
        "rmse": metrics_of(task, predictions)["rmse"],
        "mean_prediction": float(predictions.predictions.mean()),
        "mean_target": float(predictions.targets.mean()),
        "bias": float(errors.mean()),
        "rmse_without_bias": float(errors.std()),
    }


def run(preset_name: str, *, seed: int) -> list[dict[str, object]]:
    preset = PRESETS[preset_name]
    task = get_task(preset.task)
    splits = preset_splits(preset)
    source = FoundationModel.load(preset.source_model, device=preset.device)
    source_set, _ = source_prompts(preset, source, task, splits)
    target = FoundationModel.load(preset.target_model, device=preset.device)
    # The quality run fits the instant migration before its budget adapters, so this does too;
    # since the prefix cache's states stopped depending on what else was missing (bench/README),
    # the work run before no longer changes an adapter.
    vocab_map = fit_instant(
        task,
        sources=[source_set],
        source_models=[source],
        target=target,
        item_texts=splits.train_item_texts(),
        seed=preset.prompt.seed,
    ).maps[0]
    labels = splits.train_labels()
    variants = (
        ("puma, preset", "puma", preset.selection),
        ("puma, reference", "puma", SelectionConfig()),
        ("random", "random", preset.selection),
    )
    rows: list[dict[str, object]] = []
    for name, strategy, selection_config in variants:
        log(f"{name}: training the adapter on {preset.budget} users")
        chosen = select_users(
            strategy,
            prompts=source_set.prompts,
            labels=labels,
            user_ids=source_set.user_ids,
            budget=preset.budget,
            seed=seed,
            config=selection_config,
        )
        _, (validation, test) = migrate_and_predict(
            source_set=source_set,
            source=source,
            target=target,
            task=task,
            splits=splits,
            selection=chosen,
            config=replace(preset.budget_migration, seed=seed),
            vocab_map=vocab_map,
            parts=(splits.val, splits.test),
        )
        row: dict[str, object] = {
            "selection": name,
            "selected_mean_train_rating": float(
                np.mean([np.mean(labels[u]) for u in chosen.users])
            ),
            "validation": error_summary(task, validation),
            "test": error_summary(task, test),
        }
        log(json.dumps(row))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--seed", type=int, default=0, help="selection and adapter seed")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = run(args.preset, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"preset": args.preset, "seed": args.seed, "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
