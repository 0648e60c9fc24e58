"""Job records: creating migrations and prompt trainings, promotion and cancellation."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
from typing import Any

from celery import Celery
from prompt_migration_client.jobs import TERMINAL, JobState, Stage

from app.errors import BrokerUnavailableError, ConflictError, InvalidInputError, NotFoundError
from app.http.schemas import Job
from app.jobs.queue import TaskName
from app.jobs.spec import MigrationCreate, TrainRequest
from app.store import SEALED, Follower, SetMeta, Store

BUILTIN_DATASETS = ("movielens-100k", "movielens-1m", "synthetic-tiny")

log = logging.getLogger(__name__)


def request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


def check_dataset(store: Store, name: str) -> None:
    if name not in BUILTIN_DATASETS and store.get_dataset(name) is None:
        raise NotFoundError(
            f"Unknown dataset {name!r}; use one of {list(BUILTIN_DATASETS)} or register a JSONL "
            "file with POST /datasets."
        )


def _new_record(kind: str, body: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    return {
        "id": uuid.uuid4().hex,
        "kind": kind,
        "state": JobState.queued,
        "stage": Stage.queued,
        "request": body,
        "target": target,
        "fraction": 0.0,
        "users_mapped": 0,
        "users_total": None,
        "loss": None,
        "metrics": {},
        "cost": {},
        "gate": {},
        "error": None,
        "cancel_requested": False,
        "created_at": now,
        "updated_at": now,
    }


def resolve_sources(store: Store, body: MigrationCreate) -> list[SetMeta]:
    """Each source's sealed prompt set, read once for the checks and the job record."""
    metas = []
    for ref in body.sources:
        meta = store.get_meta(*store.resolve(ref.model, ref.version))
        if meta.state != SEALED:
            raise ConflictError(f"Source {meta.model} version {meta.version} is not sealed yet.")
        metas.append(meta)
    return metas


def check_budget(body: MigrationCreate, sources: list[SetMeta]) -> None:
    budget = body.selection.budget
    if body.method == "instant":
        return  # no users are selected: every user is mapped
    if budget is None:
        if body.selection.strategy != "all":
            raise InvalidInputError(
                f"selection.budget is required for strategy {body.selection.strategy!r}; give "
                "the number of users to train the adapter on, or use strategy 'all'."
            )
        return
    users = min(meta.count for meta in sources)
    if budget > users:
        raise InvalidInputError(
            f"selection.budget {budget} exceeds the {users} users of the source set; lower it."
        )


def check_input_rank(body: MigrationCreate, sources: list[SetMeta]) -> None:
    """The adapter's principal directions come from every source prompt vector: there must be
    more vectors than directions, and no more directions than features."""
    rank = body.adapter.input_rank
    if rank is None or body.method == "instant":
        return
    vectors = min(meta.count * meta.shape[0] for meta in sources)
    features = sum(meta.shape[1] for meta in sources)
    if rank >= vectors or rank > features:
        raise InvalidInputError(
            f"adapter.input_rank {rank} must be below the source set's {vectors} prompt vectors "
            f"and at most its {features} features; lower it, or leave it out to read every feature."
        )


def create_migration(
    store: Store, celery: Celery, body: MigrationCreate, *, idempotency_key: str | None
) -> tuple[dict[str, Any], bool]:
    payload = body.model_dump()
    digest = request_hash(payload)
    if idempotency_key:  # a retried request must not even re-validate against changed state
        existing = store.find_idempotent(idempotency_key, digest)
        if existing is not None:
            return existing, False
    store.get_model(body.target)
    check_dataset(store, body.dataset)
    sources = resolve_sources(store, body)
    check_budget(body, sources)
    check_input_rank(body, sources)
    target = {"model": body.target, "version": store.allocate_version(body.target)}
    record = _new_record("migration", payload, target)
    record["sources"] = [{"model": meta.model, "version": meta.version} for meta in sources]
    job, created = store.create_job(record, idempotency_key=idempotency_key, request_hash=digest)
    if created:
        start(store, celery, job, task=TaskName.train_stage, idempotency_key=idempotency_key)
    return job, created


def create_training(store: Store, celery: Celery, model: str, body: TrainRequest) -> dict[str, Any]:
    store.get_model(model)
    check_dataset(store, body.dataset)
    target = {"model": model, "version": store.allocate_version(model)}
    record = _new_record("train", body.model_dump(), target)
    record["sources"] = []
    job, _ = store.create_job(record, idempotency_key=None, request_hash="")
    start(store, celery, job, task=TaskName.train_prompt_set, idempotency_key=None)
    return job


def start(
    store: Store,
    celery: Celery,
    job: dict[str, Any],
    *,
    task: TaskName,
    idempotency_key: str | None,
) -> None:
    """Send the job's first task. If the broker does not take it, nothing ever would run the
    job: it is failed, its Idempotency-Key freed for the retry, and the request answered 503."""
    try:
        celery.send_task(task, args=[job["id"]])
    except Exception as exc:  # OperationalError, or a RuntimeError once the backend gave up
        error = (
            f"The task queue (broker) was unreachable ({exc}), so the job never started; retry "
            "the request (the same Idempotency-Key makes a new job). Operators: check "
            "PM_BROKER_URL and that the broker is running."
        )
        store.update_job(
            job["id"],
            state=JobState.failed,
            stage=Stage.failed,
            error=error,
            finished_at=time.time(),
        )
        if idempotency_key:
            store.forget_idempotency(idempotency_key, job_id=job["id"])
        raise BrokerUnavailableError(error) from exc


def wake_followers(
    store: Store, celery: Celery, followers: list[Follower], *, delay_s: float, ttl_s: float
) -> None:
    """Send a follow task to each follower that has none on its way. The users are pending
    already: a broker that does not take the task delays them to the next write, never loses
    them, so the write that called this still succeeds."""
    for follower in {f.name: f for f in followers}.values():
        if not store.claim_wake(follower.model, follower.version, ttl_s=ttl_s):
            continue
        try:
            celery.send_task(TaskName.follow, args=[follower.job_id], countdown=delay_s)
        except Exception:  # OperationalError, or a RuntimeError once the backend gave up
            store.clear_wake(follower.model, follower.version)
            log.exception("could not send the follow task of %s", follower.name)


def cancel(store: Store, job_id: str) -> dict[str, Any]:
    job = store.get_job(job_id)
    if job["state"] in TERMINAL:
        raise ConflictError(f"Job {job_id} already ended in state {job['state']!r}.")
    store.request_cancel(job_id)
    if job["state"] == JobState.queued:  # no worker has it yet; one that picks it up will skip it
        store.update_job(job_id, state=JobState.cancelled, stage=Stage.cancelled)
    return store.get_job(job_id)


def promote(store: Store, job_id: str, *, force: bool) -> dict[str, Any]:
    job = store.get_job(job_id)
    if job["kind"] != "migration":
        raise ConflictError(f"Job {job_id} is a {job['kind']} job; only migrations are promoted.")
    if job["state"] == JobState.gate_failed and not force:
        raise ConflictError(
            "The migrated set failed the quality gate; inspect `gate` and promote with "
            "?force=true if you accept it."
        )
    if job["state"] not in (JobState.awaiting_promotion, JobState.gate_failed, JobState.promoted):
        raise ConflictError(
            f"Job {job_id} is {job['state']!r}; only a finished migration can be promoted."
        )
    target = job["target"]
    sources = [s["model"] for s in job["sources"]]
    store.promote(target["model"], target["version"], sources=sources)
    store.update_job(job_id, state=JobState.promoted, stage=Stage.promoted)
    return store.get_job(job_id)


def _finite(value: Any) -> Any:
    """JSON has no NaN/Inf: a metric that could not be computed is reported as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def view(record: dict[str, Any]) -> Job:
    record = _finite(record)
    progress = {
        "fraction": record.get("fraction", 0.0),
        "users_mapped": record.get("users_mapped", 0),
        "users_total": record.get("users_total"),
        "loss": record.get("loss"),
        "epoch": record.get("epoch"),
    }
    fields = {k: v for k, v in record.items() if k in Job.model_fields}
    return Job(progress=progress, **fields)
