"""The stages of the jobs, in order; Celery tasks (workers.tasks) only wire them together.

A prompt training is one stage (workers.prompt_training). A migration:

1. ``train_and_dispatch``: draw a bounded, seeded sample of the users (workers.population) and
   load their source prompts, then select the users and train the adapter on the recipe for the
   sample (workers.adapter_training), or fit the instant map; plan the chunks and send one
   ``map_chunk`` task per chunk (workers.mapping);
2. ``map_chunk``, one per chunk, on every worker (workers.mapping);
3. ``finalize`` once every chunk answered: verify, evaluate, gate, seal, promote
   (workers.finalize).

Every stage is idempotent: what it produced is stored, and a re-delivered task skips it.
"""

from __future__ import annotations

from collections.abc import Callable

from prompt_migration_client.jobs import Stage

from models.data import Splits
from models.errors import DataError
from models.migration import common_users as users_in_every_set
from models.prompts import PromptSet
from workers.adapter_training import fit_map, job_recipe, select, train
from workers.context import JobRun, fail, run_guarded
from workers.finalize import finalize
from workers.follow import start_following
from workers.mapping import map_chunk, plan_mapping
from workers.population import draw, member_splits
from workers.prompt_training import train_prompt_set
from workers.stage_io import load_set, source_task

__all__ = [
    "JobRun",
    "fail",
    "finalize",
    "map_chunk",
    "run_guarded",
    "train_and_dispatch",
    "train_prompt_set",
]


def prepare_and_train(job: JobRun) -> int:
    """Select users, train the adapter (once), plan the chunks; returns the chunk count."""
    sources = job.record["sources"]
    task = source_task(sources)
    start_following(job)  # before the users are listed: a later write is pending, not missed
    job.update(stage=Stage.loading)
    with job.timed("splits"):
        splits = member_splits(job, task=task.name, sets=sources)
    if job.store.get_blob(job.id, "adapter") is None:
        sets, statistics = load_sample(job, sources=sources, splits=splits)
        if job.migration.method == "instant":
            with job.timed("fit"):
                fit_map(job, sources=sources, sets=statistics, task=task, splits=splits)
        else:
            settings = job_recipe(job, sets=statistics)
            with job.timed("select"):
                selected = select(job, sets=sets, splits=splits, config=settings.selection)
            with job.timed("train"):
                train(
                    job,
                    sources=sources,
                    sets=sets,
                    statistics=statistics,
                    task=task,
                    splits=splits,
                    selected=selected,
                    config=settings.adapter,
                )
    with job.timed("plan"):
        return plan_mapping(job, sources=sources, task=task)


def load_sample(
    job: JobRun, *, sources: list[dict[str, str]], splits: Splits
) -> tuple[list[PromptSet], list[PromptSet]]:
    """The prompts the training stage reads, at most two samples' worth whatever the population:
    the sets of both samples' users, and those of the statistics' sample alone."""
    with job.timed("draw"):
        drawn = draw(
            job.store,
            sources,
            limit=job.settings.sample_users,
            seed=job.migration.seed,
            can_train=splits.train.__contains__,
        )
    if not drawn.statistics:
        raise DataError("The source prompt sets share no users; nothing to migrate.")
    job.update(
        users_total=drawn.population,
        sample={
            "population": drawn.population,
            "statistics_users": len(drawn.statistics),
            "selection_users": len(drawn.trainable),
            "limit": job.settings.sample_users,
        },
    )
    wanted = sorted({*drawn.statistics, *drawn.trainable})
    with job.timed("load_sample"):
        loaded = [
            load_set(s["model"], s["version"], users=wanted, skip_missing=True) for s in sources
        ]
    held = set(users_in_every_set(loaded))  # a user erased since the draw is left out
    sets = [s.subset([u for u in wanted if u in held]) for s in loaded]
    statistics = [s.subset([u for u in drawn.statistics if u in held]) for s in sets]
    return sets, statistics


def train_and_dispatch(job: JobRun, *, dispatch: Callable[[int], None]) -> None:
    """``prepare_and_train``, then ``dispatch`` the chunk tasks once: a later delivery of the
    stage (its lease keeps it after this one) finds them sent and sends no second set."""
    chunks = prepare_and_train(job)
    if job.record.get("mapping_dispatched"):
        return
    dispatch(chunks)
    job.update(mapping_dispatched=True)
