"""What every stage runs with: the store, the loaded models, and the job's record and controls.

Every stage is idempotent and resumable: what a stage produced (the selected users, the adapter,
each written chunk) is persisted in Redis, and a re-delivered task skips what is already there.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from prompt_migration_client.jobs import TERMINAL, JobState, Stage

from app.config import Settings, get_settings
from app.errors import NotFoundError, ServiceError
from app.jobs.spec import STORED, MigrationCreate, TrainRequest
from app.store import REDIS_DOWN, SEALED, Store, connect_redis
from models.adapter import FoldedAdapter, PumaAdapter, adapter_from_bytes, fold
from models.errors import Cancelled, MigrationError
from models.foundation import FoundationModel
from workers.lease import LeaseHeld, RunsExhausted, held

# Transient: the task is delivered again later and the job stays as it is.
_COME_BACK_LATER: tuple[type[Exception], ...] = (LeaseHeld, *REDIS_DOWN)
STEP_PREFIX = "step:"  # the record's fields that time a job's steps (JobRun.timed)
_models: OrderedDict[str, FoundationModel] = OrderedDict()
_adapters: OrderedDict[str, PumaAdapter | FoldedAdapter] = OrderedDict()
ADAPTER_CACHE_SIZE = 8  # a worker maps for one job and follows the sets of a few recent ones
_store: Store | None = None


class TimeLimitExceeded(Exception):
    """A stage ran past its time limit; its job fails."""


def store() -> Store:
    global _store
    if _store is None:
        settings = get_settings()
        redis = connect_redis(
            settings.redis_url,
            timeout_s=max(settings.redis_timeout_s, 10),
            cluster=settings.redis_cluster,
        )
        _store = Store(
            redis, write_batch=settings.write_batch, reader_acl_users=settings.reader_acl_users
        )
    return _store


def load_model(name: str) -> FoundationModel:
    """A registered model, kept loaded: a worker process serves many stages of the same job."""
    if name not in _models:
        checkpoint = store().get_model(name)["checkpoint"]
        settings = get_settings()
        while len(_models) >= settings.model_cache_size:
            _models.popitem(last=False)
        _models[name] = FoundationModel.load(
            checkpoint,
            device=settings.device,
            state_dir=settings.item_state_dir,
            state_max_bytes=int(settings.item_state_max_gb * 2**30),
        )
    _models.move_to_end(name)
    return _models[name]


def stored_adapter(store: Store, job_id: str) -> PumaAdapter | FoldedAdapter:
    """A job's stored adapter in the form that maps users (``models.adapter.fold``), kept: every
    chunk task and every followed write of the job maps through it."""
    if job_id not in _adapters:
        while len(_adapters) >= ADAPTER_CACHE_SIZE:
            _adapters.popitem(last=False)
        _adapters[job_id] = fold(adapter_from_bytes(store.get_blob(job_id, "adapter") or b""))
    _adapters.move_to_end(job_id)
    return _adapters[job_id]


class JobRun:
    """One job's record and controls as a stage sees them."""

    def __init__(self, job_id: str, *, settings: Settings | None = None) -> None:
        self.id = job_id
        self.store = store()
        self.settings = settings or get_settings()
        self.record = self.store.get_job(job_id)
        self._last_check = 0.0
        self._last_progress = 0.0
        self._stage = "stage"
        self._deadline: float | None = None

    def limit_time(self, stage: str, *, seconds: float) -> None:
        """From now, this run of ``stage`` must end within ``seconds`` (see ``check_cancel``)."""
        self._stage, self._deadline = stage, time.monotonic() + seconds

    def overtime(self) -> str | None:
        """Why the stage must stop for time, or None while it is within its limit."""
        if self._deadline is None or time.monotonic() < self._deadline:
            return None
        limit = self.settings.stage_time_limit_s
        return (
            f"stage {self._stage} ran past its time limit of {limit:g} s "
            "(PM_STAGE_TIME_LIMIT_S); the job was abandoned. Retry with less work (fewer epochs, "
            "a smaller selection.budget or max_users), or raise the limit."
        )

    @property
    def target(self) -> tuple[str, str]:
        return self.record["target"]["model"], self.record["target"]["version"]

    @cached_property
    def spec(self) -> MigrationCreate | TrainRequest:
        """The job's request, typed, with the defaults the API gave it when it was made."""
        kind = MigrationCreate if self.record["kind"] == "migration" else TrainRequest
        return kind.model_validate(self.record["request"], context=STORED)

    @property
    def migration(self) -> MigrationCreate:
        spec = self.spec
        assert isinstance(spec, MigrationCreate), f"job {self.id} is not a migration"
        return spec

    @property
    def training(self) -> TrainRequest:
        spec = self.spec
        assert isinstance(spec, TrainRequest), f"job {self.id} is not a prompt training"
        return spec

    def update(self, **fields: Any) -> None:
        self.store.update_job(self.id, **fields)
        self.record.update(fields)

    @contextmanager
    def timed(self, step: str) -> Iterator[None]:
        """Add the block's wall seconds to the job's ``step:<step>`` counter (the record's
        ``cost.step_seconds`` once the job ends): where a job's time went, by what it did.
        The seconds the loaded models spent computing item states within it go to
        ``step:item_states`` too (part of the step's own, not beside it)."""
        started = time.perf_counter()
        states_before = {id(m): m.prefix_cache.compute_seconds for m in _models.values()}
        try:
            yield
        finally:
            self.store.add_seconds(self.id, STEP_PREFIX + step, time.perf_counter() - started)
            states = sum(
                m.prefix_cache.compute_seconds - states_before.get(id(m), 0.0)
                for m in _models.values()
            )
            if states > 0:
                self.store.add_seconds(self.id, STEP_PREFIX + "item_states", states)

    @staticmethod
    def step_seconds(record: dict[str, Any]) -> dict[str, float]:
        """The ``timed`` counters of a job's stored record."""
        return {
            k[len(STEP_PREFIX) :]: round(float(v), 3)
            for k, v in record.items()
            if k.startswith(STEP_PREFIX)
        }

    def should_stop(self) -> bool:
        """Asked between training steps: a cancelled or overtime stage stops (``Cancelled``,
        which ``run_guarded`` reports as a time-limit failure once past the deadline)."""
        now = time.monotonic()
        if now - self._last_check < 0.25:
            return False
        self._last_check = now
        return self.overtime() is not None or self.store.cancel_requested(self.id)

    def check_cancel(self) -> None:
        """Between steps of a stage: stop on cancellation, or past the stage's time limit."""
        overtime = self.overtime()
        if overtime is not None:
            raise TimeLimitExceeded(overtime)
        if self.store.cancel_requested(self.id):
            raise Cancelled(f"job {self.id} cancelled")

    def progress(self, start: float, span: float) -> Callable[[dict[str, float]], None]:
        """An on_progress callback mapping a stage's 0..1 onto [start, start + span]."""

        def report(info: dict[str, float]) -> None:
            now = time.monotonic()
            if now - self._last_progress < 0.5:
                return
            self._last_progress = now
            fraction = start + span * float(info.get("fraction", 0.0))
            self.update(fraction=round(fraction, 4), loss=info.get("loss"), epoch=info.get("epoch"))

        return report


def run_guarded(job_id: str, stage: Callable[[JobRun], Any], *, lease: str | None = None) -> Any:
    """Run a stage, under its ``lease`` when named (see workers.lease); turn cancellation and
    bad input into a terminal job state."""
    try:
        job = JobRun(job_id)
    except NotFoundError:
        return None  # the job record was removed; nothing to do
    if job.record["state"] in TERMINAL:
        return None
    try:
        job.check_cancel()
        if job.record["state"] != JobState.running:
            job.update(state=JobState.running, started_at=time.time())
        job.limit_time(lease or "stage", seconds=job.settings.stage_time_limit_s)
        if lease is None:
            return stage(job)
        ttl_s, max_runs = job.settings.lease_ttl_s, job.settings.max_stage_runs
        with held(job.store, job.id, lease, ttl_s=ttl_s, max_runs=max_runs):
            job.record = job.store.get_job(job.id)  # the last holder may have finished the job
            return None if job.record["state"] in TERMINAL else stage(job)
    except Cancelled:
        abandon(job, error=job.overtime())
    except (MigrationError, ServiceError, RunsExhausted, TimeLimitExceeded) as exc:
        abandon(job, error=str(exc))
    except SoftTimeLimitExceeded:  # Celery's own limit, on a pool that enforces it (not solo)
        abandon(job, error=job.overtime() or f"stage {lease} ran past Celery's soft time limit")
    except _COME_BACK_LATER:
        raise  # transient: the task is retried, the job stays as it is
    except Exception as exc:
        abandon(job, error=f"internal error: {exc!r}")
        raise
    return None


def fail(job_id: str, *, error: str) -> None:
    """Fail a job that has not ended (e.g. its stage gave up on an unreachable store)."""
    try:
        job = JobRun(job_id)
    except NotFoundError:
        return
    if job.record["state"] not in TERMINAL:
        abandon(job, error=error)


def abandon(job: JobRun, *, error: str | None = None) -> None:
    """End the job, then drop its unsealed target set (the active set is never touched); in
    that order, so a chunk still running sees the job ended after its write and drops the set
    again (workers.mapping.ended)."""
    state = JobState.cancelled if error is None else JobState.failed
    job.update(state=state, stage=Stage(state), error=error, finished_at=time.time())
    drop_unsealed_target(job)


def drop_unsealed_target(job: JobRun) -> None:
    """Delete the job's target set and what follows for it, unless it was sealed; the version
    is retired too, so a purge removes anything a late writer still leaves."""
    model, version = job.target
    try:
        if job.store.get_meta(model, version).state == SEALED:
            return
    except NotFoundError:
        pass  # never begun, or deleted already: its follow relation may still be there
    try:
        job.store.delete_set(model, version)
        job.store.retire(model, version)
    except ServiceError:
        pass
