"""The stages of the jobs, in order; Celery tasks (workers.tasks) only wire them together.

A prompt training is one stage (workers.prompt_training). A migration:

1. ``train_and_dispatch``: load every user's source prompts, then select the users and train the
   adapter on the recipe for the job's population (workers.adapter_training), or fit the instant
   map; plan the chunks and send one ``map_chunk`` task per chunk (workers.mapping);
2. ``map_chunk``, one per chunk, on every worker (workers.mapping);
3. ``finalize`` once every chunk answered: verify, evaluate, gate, seal, promote
   (workers.finalize).

Every stage is idempotent: what it produced is stored, and a re-delivered task skips it.
"""

from __future__ import annotations

from collections.abc import Callable

from models.errors import DataError
from models.migration import common_users as users_in_every_set
from workers.adapter_training import fit_map, job_recipe, select, train
from workers.context import Job, fail, run_guarded
from workers.finalize import finalize
from workers.follow import start_following
from workers.mapping import map_chunk, plan_mapping
from workers.prompt_training import train_prompt_set
from workers.sets import common_users, load_set, load_splits, source_task

__all__ = [
    "Job",
    "fail",
    "finalize",
    "map_chunk",
    "run_guarded",
    "train_and_dispatch",
    "train_prompt_set",
]


def prepare_and_train(job: Job) -> int:
    """Select users, train the adapter (once), plan the chunks; returns the chunk count."""
    sources = job.record["sources"]
    task = source_task(sources)
    start_following(job)  # before the users are listed: a later write is pending, not missed
    users = common_users(sources)
    if not users:
        raise DataError("The source prompt sets share no users; nothing to migrate.")
    job.update(stage="loading", users_total=len(users))
    splits = load_splits(job, task=task.name, users=users)
    if job.settings.load_delay_s:
        job.pause(job.settings.load_delay_s)  # test-only: leaves room to erase users here
    if job.store.get_blob(job.id, "adapter") is None:
        # One read of every user's prompts serves both stages: selection clusters the users with
        # training data, training standardises by the whole population the adapter will map.
        # A user erased since the listing is left out (the chunks skip them too).
        sets = [load_set(s["model"], s["version"], users=users, skip_missing=True)
                for s in sources]  # fmt: skip
        present = users_in_every_set(sets)
        sets = [s.subset(present) for s in sets]
        if job.request.get("method") == "instant":
            fit_map(job, sources=sources, sets=sets, task=task, splits=splits)
        else:
            settings = job_recipe(job, sets=sets)
            selected = select(job, sets=sets, splits=splits, config=settings.selection)
            train(job, sources=sources, sets=sets, task=task, splits=splits, selected=selected,
                  config=settings.adapter)  # fmt: skip
    return plan_mapping(job, sources=sources, users=users, task=task)


def train_and_dispatch(job: Job, *, dispatch: Callable[[int], None]) -> None:
    """``prepare_and_train``, then ``dispatch`` the chunk tasks once: a later delivery of the
    stage (its lease keeps it after this one) finds them sent and sends no second set."""
    chunks = prepare_and_train(job)
    if job.record.get("mapping_dispatched"):
        return
    dispatch(chunks)
    job.update(mapping_dispatched=True)
