"""A migration's mapping stage: the plan of chunks, and every chunk's users mapped through the
stored adapter into the new version."""

from __future__ import annotations

import json
import time
from typing import Any

from prompt_migration_client import codec

from app.jobs import CANCELLED, FAILED
from app.store import SetMeta
from models.adapter.model import adapter_from_bytes
from models.migration import common_users as users_in_every_set
from models.migration import map_prompts, stack_sources
from models.tasks import Task
from workers.context import Job, drop_unsealed_target, load_model
from workers.lease import held
from workers.sets import encode_rows, load_set

_adapters: dict[str, Any] = {}


def plan_mapping(job: Job, *, sources: list[dict[str, str]], users: list[str], task: Task) -> int:
    model, version = job.target
    plan = job.store.get_blob(job.id, "plan")
    if plan is None:
        job.update(users_planned=len(users))
        plan = json.dumps(split_chunks(job, users)).encode()
        job.store.put_blob(job.id, "plan", plan)
    first = job.store.get_meta(sources[0]["model"], sources[0]["version"])
    width = load_model(model).hidden_size
    meta = SetMeta(
        model=model,
        version=version,
        task=task.name,
        shape=[first.shape[0], int(width)],
        dtype=str(job.request.get("dtype") or "float32"),
        template=first.template,
        lineage={
            "job": job.id,
            "kind": "migration",
            "method": job.request.get("method") or "adapter",
            "parents": sources,
        },
    )
    job.store.begin_set(meta)
    job.store.put_head(model, version, job.store.get_blob(job.id, "head") or b"")
    job.update(stage="mapping", fraction=0.5)
    return len(json.loads(plan))


def planned_chunks(job: Job) -> list[list[str]]:
    return list(json.loads(job.store.get_blob(job.id, "plan") or b"[]"))


def split_chunks(job: Job, users: list[str]) -> list[list[str]]:
    size = int(job.request.get("chunk_size") or job.settings.chunk_size)
    return [users[i : i + size] for i in range(0, len(users), size)]


def map_missing_chunks(job: Job) -> None:
    """Map, here, every chunk of the plan not done yet (one a lost chord message never ran, or
    one added after the chord)."""
    done = job.store.chunks_done(job.id)
    for index in range(len(planned_chunks(job))):
        if index not in done:  # map_chunk checks again: a chord task may finish it meanwhile
            job.check_cancel()
            # A chunk task still on it holds the lease: finalize then comes back later.
            ttl_s, max_runs = job.settings.lease_ttl_s, job.settings.max_stage_runs
            with held(job.store, job.id, f"chunk:{index}", ttl_s=ttl_s, max_runs=max_runs):
                map_chunk(job, index)


def ended(job: Job) -> bool:
    """After a chunk's write: a job cancelled or failed meanwhile may have had its set deleted
    before this write landed, so the chunk deletes it again (a cancellation not yet acted on
    then ends the job here, through run_guarded)."""
    record = job.store.get_job(job.id)
    if record["state"] not in (FAILED, CANCELLED) and not record.get("cancel_requested"):
        return False
    drop_unsealed_target(job)
    if record["state"] not in (FAILED, CANCELLED):
        job.check_cancel()
    return True


def _adapter(job: Job) -> Any:

    if job.id not in _adapters:
        _adapters.clear()
        _adapters[job.id] = adapter_from_bytes(job.store.get_blob(job.id, "adapter") or b"")
    return _adapters[job.id]


def map_chunk(job: Job, index: int) -> dict[str, Any]:
    """Map one chunk of users into the new version; a repeat overwrites the same values."""

    if index in job.store.chunks_done(job.id):
        return {"chunk": index, "skipped": True}
    started = time.perf_counter()
    if job.settings.chunk_delay_s:
        job.pause(job.settings.chunk_delay_s)  # test-only: leaves room to kill a worker here
    sets = [
        load_set(s["model"], s["version"], users=planned_chunks(job)[index], skip_missing=True)
        for s in job.record["sources"]
    ]
    users = users_in_every_set(sets)  # an erasure since planning leaves a user out
    mapped = map_prompts(_adapter(job), stack_sources(sets, users))
    items = encode_rows(users, mapped, dtype=str(job.request.get("dtype") or "float32"))
    model, version = job.target
    job.store.write_prompts(model, version, items)
    if ended(job):
        return {"chunk": index, "discarded": True}
    if job.store.mark_chunk_done(job.id, index, count=len(items), digest=codec.set_digest(items)):
        job.store.add_seconds(job.id, "map_seconds", time.perf_counter() - started)
    done = job.store.chunks_done(job.id)
    mapped_users = sum(count for count, _ in done.values())
    total = max(1, int(job.record.get("users_total") or 1))
    job.update(fraction=round(0.5 + 0.4 * mapped_users / total, 4))
    return {"chunk": index, "users": len(items), "seconds": time.perf_counter() - started}
