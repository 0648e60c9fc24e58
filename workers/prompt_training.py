"""The prompt-training job: every user's prompt trained on one model, evaluated, stored and sealed."""

from __future__ import annotations

import time
from dataclasses import replace

from prompt_migration_client.jobs import JobState, Stage

from app.store import SetMeta
from models.evaluation import evaluate
from models.tasks import get_task
from models.training import PromptTrainingConfig, train_prompts
from workers.context import JobRun, load_model
from workers.stage_io import load_splits, write_set


def train_prompt_set(job: JobRun) -> None:

    request, (model_name, version) = job.training, job.target
    task = get_task(request.task)
    job.update(stage=Stage.loading)
    splits = load_splits(job, task=task.name)
    model = load_model(model_name)
    config = PromptTrainingConfig(
        epochs=request.epochs, prompt_length=request.prompt_length, seed=request.seed
    )
    if request.lr is not None:
        config = replace(config, lr=request.lr)
    job.update(stage=Stage.training, users_total=len(splits.users))
    result = train_prompts(
        model,
        task,
        splits,
        config=config,
        on_progress=job.progress(0.0, 0.8),
        should_stop=job.should_stop,
    )
    prompt_set = result.prompt_set
    prompt_set.model = model_name
    job.update(stage=Stage.evaluating, fraction=0.85)
    metrics = evaluate(model, task, prompt_set, splits.test)
    job.check_cancel()
    meta = SetMeta(
        model=model_name,
        version=version,
        task=task.name,
        shape=[prompt_set.prompt_length, prompt_set.width],
        dtype=request.dtype,
        template=task.template.prefix + "<prompt>" + task.template.suffix,
        lineage={"job": job.id, "kind": "train", "dataset": request.dataset, "parents": []},
    )
    job.update(stage=Stage.writing, fraction=0.95)
    write_set(job, prompt_set, meta=meta, metrics={"test": metrics})
    if request.activate:
        job.store.activate(model_name, version)
    cost = {
        "train_seconds": round(result.seconds, 3),
        "example_passes": result.example_passes,
        "users_trained": len(prompt_set.user_ids),
    }
    job.update(
        state=JobState.succeeded,
        stage=Stage.done,
        fraction=1.0,
        users_mapped=len(prompt_set.user_ids),
        metrics={"test": metrics},
        cost=cost,
        finished_at=time.time(),
    )
