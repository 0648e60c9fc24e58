"""A migration's mapping stage: the plan of chunks, and every chunk's users mapped through the
stored adapter into the new version."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from prompt_migration_client import codec
from prompt_migration_client.jobs import JobState, Stage

from app.store import SetMeta
from models.errors import DataError
from models.migration import map_prompts
from models.tasks import Task
from workers.context import JobRun, drop_unsealed_target, load_model, stored_adapter
from workers.lease import held
from workers.population import scan_common

# Users per part of a chunk that map_users reads, maps (in one batch) and writes in turn
# (overlapped).
MAP_PART = 1024


def plan_mapping(job: JobRun, *, sources: list[dict[str, str]], task: Task) -> int:
    """Plan the chunks (once: a re-delivered stage resumes an unfinished plan) and begin the new
    set; returns the chunk count."""
    model, version = job.target
    if not job.record.get("plan_complete"):
        plan_users(job, sources=sources)
        planned = job.store.planned_users(job.id)
        if not planned:
            raise DataError("The source prompt sets share no users; nothing to migrate.")
        job.update(plan_complete=True, users_planned=planned, users_total=planned)
    first = job.store.get_meta(sources[0]["model"], sources[0]["version"])
    width = load_model(model).hidden_size
    meta = SetMeta(
        model=model,
        version=version,
        task=task.name,
        shape=[first.shape[0], int(width)],
        dtype=job.migration.dtype,
        template=first.template,
        lineage={
            "job": job.id,
            "kind": "migration",
            "method": job.migration.method,
            "parents": sources,
        },
    )
    job.store.begin_set(meta)
    job.store.put_head(model, version, job.store.get_blob(job.id, "head") or b"")
    job.update(stage=Stage.mapping, fraction=0.5)
    return job.store.plan_size(job.id)


def plan_users(job: JobRun, *, sources: list[dict[str, str]]) -> int:
    """Append chunks of the sources' users that no chunk holds yet, streaming over the sources
    (one chunk in memory); returns how many users were added."""
    size = job.migration.chunk_size or job.settings.chunk_size
    pending: dict[str, None] = {}  # ordered, and a user SSCAN lists twice is held once
    added = 0
    for batch in scan_common(job.store, sources):
        pending.update(dict.fromkeys(job.store.unplanned(job.id, batch)))
        while len(pending) >= size:
            chunk = list(pending)[:size]
            job.store.add_plan_chunk(job.id, chunk)
            for user in chunk:
                del pending[user]
            added += len(chunk)
    if pending:
        job.store.add_plan_chunk(job.id, list(pending))
        added += len(pending)
    return added


def map_missing_chunks(job: JobRun) -> None:
    """Map, here, every chunk of the plan not done yet (one a lost chord message never ran, or
    one added after the chord)."""
    done = job.store.chunks_done(job.id)
    for index in range(job.store.plan_size(job.id)):
        if index not in done:  # map_chunk checks again: a chord task may finish it meanwhile
            job.check_cancel()
            # A chunk task still on it holds the lease: finalize then comes back later.
            ttl_s, max_runs = job.settings.lease_ttl_s, job.settings.max_stage_runs
            with held(job.store, job.id, f"chunk:{index}", ttl_s=ttl_s, max_runs=max_runs):
                map_chunk(job, index)


def ended(job: JobRun) -> bool:
    """After a chunk's write: a job cancelled or failed meanwhile may have had its set deleted
    before this write landed, so the chunk deletes it again (a cancellation not yet acted on
    then ends the job here, through run_guarded)."""
    record = job.store.get_job(job.id)
    if record["state"] not in (JobState.failed, JobState.cancelled) and not record.get(
        "cancel_requested"
    ):
        return False
    drop_unsealed_target(job)
    if record["state"] not in (JobState.failed, JobState.cancelled):
        job.check_cancel()
    return True


def map_chunk(job: JobRun, index: int) -> dict[str, Any]:
    """Map one chunk of users into the new version; a repeat overwrites the same values."""

    if index in job.store.chunks_done(job.id):
        return {"chunk": index, "skipped": True}
    started = time.perf_counter()
    count, digest = map_users(job, job.store.plan_chunk(job.id, index))
    if ended(job):
        return {"chunk": index, "discarded": True}
    if job.store.mark_chunk_done(job.id, index, count=count, digest=digest):
        job.store.add_seconds(job.id, "map_seconds", time.perf_counter() - started)
    done = job.store.chunks_done(job.id)
    mapped_users = sum(count for count, _ in done.values())
    total = max(1, int(job.record.get("users_total") or 1))
    job.update(fraction=round(0.5 + 0.4 * mapped_users / total, 4))
    return {"chunk": index, "users": count, "seconds": time.perf_counter() - started}


def map_users(job: JobRun, users: list[str]) -> tuple[int, str]:
    """Read, map, write and read back ``users`` a part at a time; returns the count and digest of
    what was written. One thread does the store's round trips while this one maps (socket waits
    and torch's kernels release the GIL): the last part is written, then the next one read, while
    this one is mapped, so Redis has one of the chunk's commands at a time and reads wait behind
    no more."""
    sources = job.record["sources"]
    metas = [job.store.get_meta(s["model"], s["version"]) for s in sources]
    dtype = job.migration.dtype
    model, version = job.target
    adapter = stored_adapter(job.store, job.id)
    parts = [users[i : i + MAP_PART] for i in range(0, len(users), MAP_PART)] or [[]]
    with ThreadPoolExecutor(max_workers=1) as io, torch_threads(job.settings.map_threads):
        reading = io.submit(read_sources, job, parts[0], metas=metas)
        writes = []
        for following in [*parts[1:], None]:
            part, rows = reading.result()
            if following is not None:
                reading = io.submit(read_sources, job, following, metas=metas)
            with torch.inference_mode():
                values = encode_values(map_prompts(adapter, rows, batch_size=MAP_PART), dtype)
            writes.append(io.submit(job.store.write_checked, model, version, part, values))
        written = [w.result() for w in writes]
    return sum(c for c, _ in written), codec.combine_digests(d for _, d in written)


def read_sources(
    job: JobRun, users: list[str], *, metas: list[SetMeta]
) -> tuple[list[str], torch.Tensor]:
    """The users who still have a prompt on every source (an erasure since planning leaves a user
    out) and their prompts concatenated on features, ``[n, l, sum d]`` fp32: one MGET per few
    thousand users and one decode of the joined bytes per source."""
    values = [job.store.read_values(m.model, m.version, users) for m in metas]
    keep = [i for i in range(len(users)) if all(v[i] is not None for v in values)]
    blocks = []
    for meta, stored in zip(metas, values, strict=True):
        data = bytearray().join(stored[i] or b"" for i in keep)  # writable: torch shares it
        shape = (len(keep), *meta.shape)
        array = np.frombuffer(data, dtype=codec.numpy_dtype(meta.dtype))
        if array.size != int(np.prod(shape)):
            raise DataError(
                f"{meta.model} version {meta.version} holds prompts of another size than its "
                f"shape {meta.shape} {meta.dtype}; re-import or retrain the set."
            )
        blocks.append(torch.from_numpy(array.reshape(shape).astype(np.float32, copy=False)))
    return [users[i] for i in keep], torch.cat(blocks, dim=-1)


def encode_values(mapped: torch.Tensor, dtype: str) -> list[memoryview]:
    """Each row's stored bytes (``codec.encode`` of the row): one conversion, then views of it
    (no copy per row; the store's writes and digests take them as they are)."""
    array = np.ascontiguousarray(mapped.numpy(), dtype=codec.numpy_dtype(dtype))
    raw, step = memoryview(array.tobytes()), array[0].nbytes if len(array) else 0
    return [raw[i * step : (i + 1) * step] for i in range(len(array))]


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
