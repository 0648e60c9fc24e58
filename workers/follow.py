"""A migration's target follows its sources: every user written on a source after the job began
(onboarded, updated, erased) ends with the stored adapter's mapping of their latest source
prompt, or with none.

The job records the relation before it lists its users (``start_following``), so a user written
at any moment is either listed, and mapped from the value a chunk reads, or pending. Chunks and
the drain never write the set at once: while it is written, the pending users wait; finalize
drains them once every chunk is done and the set is sealed, before promoting it, and from then
on a follow task, sent by each write (app.jobs.records.wake_followers), applies them within about a
second, until the sources are purged (app/store/follow.py: the relation goes with them).

Writes addressed to the target model while the job writes its new version are followed the
same way: the new version also follows the version active when the job began, and copies what
is written there. Which write wins is which came last (each pending entry carries its stamp):
a PUT to the target after the user's last source write keeps the PUT's prompt; a later source
write replaces it with the mapping of the new source prompt.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from prompt_migration_client import codec

from app.config import get_settings
from app.errors import NotFoundError, ServiceError
from app.jobs.records import wake_followers
from app.store import SEALED, Change, Follower, Store
from models.migration import map_prompts
from workers.celery_app import app
from workers.context import JobRun, stored_adapter
from workers.lease import LeaseHeld, holder_name
from workers.mapping import torch_threads
from workers.stage_io import encode_rows

LEASE = "follow"


@dataclass
class Drained:
    created: int = 0
    removed: int = 0
    applied: int = 0


def start_following(job: JobRun) -> None:
    """Make the job's target follow its sources and the target model's active version (direct
    writes to it); once per job, before its users are listed."""
    if "follows_target" in job.record:
        return
    model, version = job.target
    sources = [(s["model"], s["version"]) for s in job.record["sources"]]
    active = job.store.active_pointers().get(model)
    direct = None
    if active is not None and active != version and (model, active) not in sources:
        direct = {"model": model, "version": active}
    followed = [*sources, *([(model, active)] if direct else [])]
    job.store.follow(follower=(model, version), followed=followed, job_id=job.id)
    job.update(follows_target=direct)


def _rows(store: Store, model: str, version: str, users: list[str]) -> dict[str, np.ndarray]:
    meta = store.get_meta(model, version)
    values = store.get_prompts(model, version, users)
    shape = tuple(meta.shape)
    return {
        u: codec.decode(v, dtype=meta.dtype, shape=shape)
        for u, v in zip(users, values, strict=True)
        if v is not None
    }


def mapped_changes(store: Store, record: dict[str, Any], pending: dict[str, int]) -> list[Change]:
    """Each pending user's latest source prompts through the job's adapter; None for a user
    missing from any source (erased)."""
    users = sorted(pending)
    per_source = [_rows(store, s["model"], s["version"], users) for s in record["sources"]]
    present = [u for u in users if all(u in rows for rows in per_source)]
    values: dict[str, bytes] = {}
    if present:
        stacked = torch.from_numpy(
            np.concatenate([np.stack([rows[u] for u in present]) for rows in per_source], -1)
        )
        with torch_threads(get_settings().map_threads):  # as the chunks map: see map_threads
            mapped = map_prompts(stored_adapter(store, record["id"]), stacked)
        dtype = str(record["request"].get("dtype") or "float32")
        values = dict(encode_rows(present, mapped, dtype=dtype))
    return [Change(u, values.get(u), pending[u]) for u in users]


def copied_changes(
    store: Store, *, direct: dict[str, str], target: tuple[str, str], pending: dict[str, int]
) -> list[Change]:
    """Each pending user's latest prompt written to the target model's previous version, in the
    new version's dtype; a prompt of another shape cannot be carried over and is left out."""
    users = sorted(pending)
    rows = _rows(store, direct["model"], direct["version"], users)
    meta = store.get_meta(*target)
    changes = []
    for user in users:
        row = rows.get(user)
        if row is not None and list(row.shape) != list(meta.shape):
            continue
        value = None if row is None else codec.encode(row, meta.dtype)
        changes.append(Change(user, value, pending[user]))
    return changes


def drain(store: Store, record: dict[str, Any], *, holder: str, batch: int) -> Drained:
    """Apply every pending user of the job's target, batch by batch, until none is left; the
    caller holds the follow lease (one drain per set at a time, so that an older read is never
    written over a newer one)."""
    target = (record["target"]["model"], record["target"]["version"])
    direct = record.get("follows_target")
    followed = [(s["model"], s["version"]) for s in record["sources"]]
    live = set(store.followed_sets(*target))
    if not live.issuperset(followed):  # a source was purged: its users can be mapped no more
        for source in followed:
            store.unfollow(follower=target, followed=source)
        followed = []
    if direct and (direct["model"], direct["version"]) in live:
        followed.append((direct["model"], direct["version"]))
    totals = Drained()
    while True:
        store.clear_wake(*target)  # a write from now on sends a new task
        seen = 0
        for source in followed:
            pending = store.pending_users(source, target, count=batch)
            if not pending:
                continue
            seen += len(pending)
            if direct and source == (direct["model"], direct["version"]):
                changes = copied_changes(store, direct=direct, target=target, pending=pending)
            else:
                changes = mapped_changes(store, record, pending)
            applied = store.apply_followed(*target, changes)
            store.ack_pending(source, target, pending)
            totals.created += applied.created
            totals.removed += applied.removed
            totals.applied += len(changes)
            _wake(store, applied.followers)
            if not store.renew_lease(record["id"], LEASE, holder=holder, ttl_s=_ttl_s()):
                return totals  # another drain took over
        if not seen:
            return totals


def _ttl_s() -> float:
    return get_settings().lease_ttl_s


def _wake(store: Store, followers: list[Follower]) -> None:
    """Chained migrations: the sets that follow this one apply what it was just given."""
    if not followers:
        return
    settings = get_settings()
    wake_followers(
        store, app, followers, delay_s=settings.follow_delay_s, ttl_s=settings.follow_wake_ttl_s
    )


@contextlib.contextmanager
def follow_lease(store: Store, job_id: str, *, wait_s: float) -> Iterator[str]:
    """Hold the job's follow lease, waiting up to ``wait_s`` for a drain that holds it."""
    holder, deadline = holder_name(), time.monotonic() + wait_s
    while not store.take_lease(job_id, LEASE, holder=holder, ttl_s=_ttl_s()):
        if time.monotonic() >= deadline:
            raise LeaseHeld(
                f"the follow of job {job_id} runs on {store.lease_holder(job_id, LEASE)}"
            )
        time.sleep(0.05)
    try:
        yield holder
    finally:
        store.drop_lease(job_id, LEASE, holder=holder)


def follow(store: Store, job_id: str, *, batch: int) -> int:
    """The follow task: drain the job's sealed target (a set still written waits for
    finalize); returns how many pending entries it applied. ``LeaseHeld`` when another drain
    runs: the task comes back, in case that drain's worker died. After the lease is dropped,
    users pending again (their task found the lease held) are drained here too."""
    applied, first = 0, True
    while True:
        record = store.find_job(job_id)
        if record is None or not _sealed(store, record):
            return applied
        if first:
            store.count(job_id, "follow_tasks")  # the broker messages following costs
        try:
            with follow_lease(store, job_id, wait_s=0) as holder:
                applied += drain(store, record, holder=holder, batch=batch).applied
        except LeaseHeld:
            if first:
                raise
            return applied  # that holder looks again once it is done
        except ServiceError:
            return applied  # the set (or a source) was deleted meanwhile: nothing to follow
        first = False
        target = record["target"]
        if not store.has_pending(target["model"], target["version"]):
            return applied


def _sealed(store: Store, record: dict[str, Any]) -> bool:
    try:
        meta = store.get_meta(record["target"]["model"], record["target"]["version"])
    except NotFoundError:
        return False
    return meta.state == SEALED


def drain_before_promotion(job: JobRun) -> Drained:
    """finalize, once the set is sealed: apply what was written on the sources (and to the
    target model) while the job ran, before readers are moved to the set."""
    with follow_lease(job.store, job.id, wait_s=job.settings.lease_ttl_s) as holder:
        return drain(
            job.store, job.store.get_job(job.id), holder=holder, batch=job.settings.follow_batch
        )
