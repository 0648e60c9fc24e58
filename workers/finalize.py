"""A migration's last stage: verify, evaluate, gate, seal and (maybe) promote."""

from __future__ import annotations

import time
from typing import Any

from prompt_migration_client import codec
from prompt_migration_client.jobs import JobState, Stage

from app.errors import ConflictError
from models.evaluation import baseline_metrics, evaluate
from models.tasks import Task
from workers.context import JobRun, load_model
from workers.follow import drain_before_promotion
from workers.mapping import map_missing_chunks
from workers.population import member_splits, sample
from workers.stage_io import load_set, source_task


def finalize(job: JobRun) -> None:
    """Verify, evaluate, gate, seal and (maybe) promote; safe to run more than once (its
    task holds a lease, so never twice at once). The metrics and the gate are computed on a
    seeded sample of the test users (``PM_EVAL_USERS``), all of them when there are fewer."""

    map_missing_chunks(job)
    job.check_cancel()
    model, version = job.target
    job.update(stage=Stage.evaluating, fraction=0.92)
    task = source_task(job.record["sources"])
    with job.timed("evaluate"):
        metrics, gate = evaluate_and_gate(job, task=task)
    done = job.store.chunks_done(job.id)
    expected_count = sum(count for count, _ in done.values())
    expected_digest = codec.combine_digests(d for _, d in done.values())
    planned = int(job.record.get("users_total") or 0)
    job.update(stage=Stage.sealing, fraction=0.95)
    with job.timed("seal"):
        sealed = job.store.seal_set(
            model,
            version,
            expected_count=expected_count,
            expected_digest=expected_digest,
            metrics=metrics,
        )
    # Every write on the sources (or to the target model) since the job began, before readers
    # move: the users listed at the start are mapped, the others are pending (workers/follow.py).
    with job.timed("drain"):
        drained = drain_before_promotion(job)
    state = JobState.gate_failed if not gate["passed"] else JobState.awaiting_promotion
    if gate["passed"] and job.migration.auto_promote:
        state = auto_promote(job, model=model, version=version)
    with job.timed("purge"):
        job.store.drop_plan(job.id)  # the set is sealed: no chunk is mapped again
        job.store.purge_retired(grace_s=job.settings.version_grace_s)
    cost = dict(job.record.get("cost") or {})
    cost["wall_seconds"] = round(time.time() - float(job.record.get("started_at") or 0), 3)
    cost["users_mapped"] = job.store.get_meta(model, version).count
    cost["users_erased_during_run"] = planned - sealed.count + drained.removed
    cost["users_onboarded_during_run"] = drained.created
    stored = job.store.get_job(job.id)  # the counters the chunk tasks and timed steps added
    cost["map_seconds"] = round(float(stored.get("map_seconds") or 0), 3)
    cost["step_seconds"] = JobRun.step_seconds(stored)
    job.update(
        state=state,
        stage=Stage.done,
        fraction=1.0,
        metrics=metrics,
        gate=gate,
        cost=cost,
        finished_at=time.time(),
    )


def evaluate_and_gate(job: JobRun, *, task: Task) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metrics of the migrated set, its sources and no personalisation on a seeded sample of
    the test users, and the gate's verdict on them."""
    model, version = job.target
    splits = member_splits(job, task=task.name, sets=[{"model": model, "version": version}])
    seed = job.migration.seed
    sampled = sample(splits.test, limit=job.settings.eval_users, seed=seed)
    tested = {u: splits.test[u] for u in sampled}
    migrated = load_set(model, version, users=sampled, skip_missing=True)
    test_users = migrated.user_ids
    migrated_metrics = evaluate(load_model(model), task, migrated, tested)
    source_metrics = {}
    for s in job.record["sources"]:
        key = f"{s['model']}@{s['version']}"
        cached = cached_source_metrics(job, s, test_users)
        if cached is not None:
            source_metrics[key] = cached
            continue
        source_set = load_set(s["model"], s["version"], users=test_users, skip_missing=True)
        source_metrics[key] = evaluate(load_model(s["model"]), task, source_set, tested)
    # Scored on the same test users as the sets: what serving no prompt at all would give.
    test = {u: splits.test[u] for u in test_users}
    no_prompt = baseline_metrics(task, train=splits.train, test=test)
    job.update(
        sample=dict(job.record.get("sample") or {})
        | {"test_users": len(test_users), "test_limit": job.settings.eval_users}
    )
    job.check_cancel()
    gate = quality_gate(
        task=task,
        migrated=migrated_metrics,
        sources=source_metrics,
        baseline=no_prompt,
        tolerance=gate_tolerance(job),
    )
    metrics = {
        "migrated": migrated_metrics,
        "sources": source_metrics,
        "baseline": no_prompt,
        "task": task.name,
    }
    return metrics, gate


def auto_promote(job: JobRun, *, model: str, version: str) -> JobState:
    """Promoted, or awaiting promotion with the reason when a newer set of the model is served."""
    try:
        job.store.promote(model, version, sources=[s["model"] for s in job.record["sources"]])
    except ConflictError as refused:
        job.update(promotion_refused=refused.detail)
        return JobState.awaiting_promotion
    return JobState.promoted


def cached_source_metrics(
    job: JobRun, source: dict[str, str], test_users: list[str]
) -> dict[str, Any] | None:
    """A trained set's own test metrics, when they cover exactly these users on this dataset."""
    meta = job.store.get_meta(source["model"], source["version"])
    lineage, test = meta.lineage, meta.metrics.get("test")
    if test is None or meta.count != len(test_users):
        return None
    same_data = lineage.get("kind") == "train" and lineage.get("dataset") == job.migration.dataset
    covers = int(test.get("n_users") or -1) == len(test_users)
    return dict(test) if same_data and covers else None


def quality_gate(
    *,
    task: Task,
    migrated: dict[str, Any],
    sources: dict[str, dict[str, Any]],
    baseline: dict[str, Any],
    tolerance: float,
) -> dict[str, Any]:
    """Passes when the migrated set is at most ``tolerance`` worse than the best source and no
    worse than no personalisation (``baseline``), whatever the tolerance. Fails closed: a metric
    that cannot be computed fails it (an operator may still promote with ``force``)."""
    metric = task.primary_metric
    value = migrated.get(metric)
    source_values = [v[metric] for v in sources.values() if v.get(metric) is not None]
    best = (min if task.lower_is_better else max)(source_values) if source_values else None
    floor = baseline.get(metric)
    gate = {
        "metric": metric,
        "migrated": value,
        "best_source": best,
        "baseline": floor,
        "tolerance": tolerance,
    }
    if value is None or best is None or floor is None:
        missing = [
            name
            for name, v in (("migrated", value), ("best_source", best), ("baseline", floor))
            if v is None
        ]
        return gate | {
            "passed": False,
            "reason": (
                f"{metric} could not be computed for {', '.join(missing)} (too few test "
                "interactions, or one class only); the gate fails closed. Check the set and promote "
                "with ?force=true if you accept it."
            ),
        }
    sign = 1.0 if task.lower_is_better else -1.0
    worse_by = sign * (value - best)
    gate["worse_by"] = worse_by
    if sign * (value - floor) > 0:
        return gate | {
            "passed": False,
            "reason": (
                f"{metric} {value:.4f} is worse than no personalisation ({floor:.4f}, every "
                "interaction predicted as the training data's global mean): serving this set "
                "would hurt users whatever the tolerance."
            ),
        }
    if worse_by > tolerance:
        return gate | {
            "passed": False,
            "reason": (
                f"{metric} {value:.4f} is worse than the best source ({best:.4f}) by "
                f"{worse_by:.4f}, more than the tolerance {tolerance}."
            ),
        }
    return gate | {
        "passed": True,
        "reason": "within the tolerance of the best source and better than no personalisation",
    }


def gate_tolerance(job: JobRun) -> float:
    tolerance = job.migration.quality_gate.tolerance
    return job.settings.quality_tolerance if tolerance is None else float(tolerance)
