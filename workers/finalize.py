"""A migration's last stage: verify, evaluate, gate, seal and (maybe) promote."""

from __future__ import annotations

import time
from typing import Any

from app import codec
from app.jobs import (
    AWAITING,
    GATE_FAILED,
    PROMOTED,
)
from app.store import SEALED
from models.evaluation import evaluate
from models.tasks import Task
from workers.context import Job, load_model
from workers.mapping import map_late_users, map_missing_chunks, planned_chunks
from workers.sets import load_set, load_splits, source_task


def finalize(job: Job) -> None:
    """Verify, evaluate, gate, seal and (maybe) promote; safe to run more than once (its
    task holds a lease, so never twice at once)."""

    map_missing_chunks(job)
    chunks = planned_chunks(job)
    job.check_cancel()
    job.update(stage="verifying", fraction=0.9)
    model, version = job.target
    users = sorted(u for chunk in chunks for u in chunk)
    job.update(stage="evaluating", fraction=0.92)
    task = source_task(job.record["sources"])
    splits = load_splits(job, task=task.name, users=users)
    test_users = [u for u in users if u in splits.test]
    migrated = load_set(model, version, users=test_users, skip_missing=True)
    test_users = migrated.user_ids
    migrated_metrics = evaluate(load_model(model), task, migrated, splits.test)
    source_metrics = {}
    for s in job.record["sources"]:
        key = f"{s['model']}@{s['version']}"
        cached = cached_source_metrics(job, s, test_users)
        if cached is not None:
            source_metrics[key] = cached
            continue
        source_set = load_set(s["model"], s["version"], users=test_users, skip_missing=True)
        source_metrics[key] = evaluate(load_model(s["model"]), task, source_set, splits.test)
    job.check_cancel()
    gate = quality_gate(
        task=task,
        migrated=migrated_metrics,
        sources=source_metrics,
        tolerance=gate_tolerance(job),
    )
    metrics = {"migrated": migrated_metrics, "sources": source_metrics, "task": task.name}
    # Last before sealing, so the window in which a new user can still be missed stays short;
    # a re-run after sealing must not write into the sealed set.
    if job.store.get_meta(model, version).state != SEALED:
        map_late_users(job)
    done = job.store.chunks_done(job.id)
    expected_count = sum(count for count, _ in done.values())
    expected_digest = codec.combine_digests(d for _, d in done.values())
    planned = sum(len(chunk) for chunk in planned_chunks(job))
    sealed = job.store.seal_set(
        model,
        version,
        expected_count=expected_count,
        expected_digest=expected_digest,
        metrics=metrics,
    )
    state = GATE_FAILED if not gate["passed"] else AWAITING
    if gate["passed"] and job.request.get("auto_promote", True):
        job.store.activate(model, version)
        state = PROMOTED
    job.store.purge_retired(grace_s=job.settings.version_grace_s)
    cost = dict(job.record.get("cost") or {})
    cost["wall_seconds"] = round(time.time() - float(job.record.get("started_at") or 0), 3)
    cost["users_mapped"] = sealed.count
    cost["users_erased_during_run"] = planned - sealed.count
    cost["users_onboarded_during_run"] = planned - int(job.record.get("users_planned") or planned)
    cost["map_seconds"] = round(float(job.store.get_job(job.id).get("map_seconds") or 0), 3)
    job.update(
        state=state,
        stage="done",
        fraction=1.0,
        metrics=metrics,
        gate=gate,
        cost=cost,
        finished_at=time.time(),
    )


def cached_source_metrics(
    job: Job, source: dict[str, str], test_users: list[str]
) -> dict[str, Any] | None:
    """A trained set's own test metrics, when they cover exactly these users on this dataset."""
    meta = job.store.get_meta(source["model"], source["version"])
    lineage, test = meta.lineage, meta.metrics.get("test")
    if test is None or meta.count != len(test_users):
        return None
    same_data = lineage.get("kind") == "train" and lineage.get("dataset") == job.request["dataset"]
    covers = int(test.get("n_users") or -1) == len(test_users)
    return dict(test) if same_data and covers else None


def quality_gate(
    *, task: Task, migrated: dict[str, Any], sources: dict[str, dict[str, Any]], tolerance: float
) -> dict[str, Any]:
    """The migrated set may be worse than the best source by at most ``tolerance``."""
    metric = task.primary_metric
    values = [v[metric] for v in sources.values() if v.get(metric) is not None]
    value = migrated.get(metric)
    if value is None or not values:
        return {"passed": True, "metric": metric, "reason": "metric not computable; not gated"}
    best = min(values) if task.lower_is_better else max(values)
    worse_by = (value - best) if task.lower_is_better else (best - value)
    return {
        "passed": bool(worse_by <= tolerance),
        "metric": metric,
        "migrated": value,
        "best_source": best,
        "worse_by": worse_by,
        "tolerance": tolerance,
    }


def gate_tolerance(job: Job) -> float:
    tolerance = (job.request.get("quality_gate") or {}).get("tolerance")
    return job.settings.quality_tolerance if tolerance is None else float(tolerance)
