"""Stage logic of the jobs; Celery tasks (workers.tasks) only wire these together.

Every stage is idempotent and resumable: what a stage produced (the selected users, the adapter,
each written chunk) is persisted in Redis, and a re-delivered task skips what is already there.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from app import codec
from app.config import Settings, get_settings
from app.errors import NotFoundError, ServiceError
from app.jobs import (
    AWAITING,
    CANCELLED,
    FAILED,
    GATE_FAILED,
    PROMOTED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
)
from app.store import REDIS_DOWN, SEALED, SetMeta, Store, connect_redis
from models import recipe
from models.adapter.model import adapter_from_bytes, adapter_to_bytes
from models.data import Splits, load_interactions, split_chronological
from models.errors import Cancelled, DataError, MigrationError
from models.evaluation import evaluate
from models.foundation import FoundationModel
from models.instant import fit_instant, fit_vocab_map
from models.migration import MigrationConfig, map_prompts, stack_sources, train_adapter
from models.migration import common_users as users_in_every_set
from models.prompts import PromptSet
from models.selection import Selection, SelectionConfig, select_users
from models.tasks import Task, get_task
from models.training import PromptTrainingConfig, train_prompts
from workers.lease import LeaseHeld, held

# Transient: the task is delivered again later and the job stays as it is.
_COME_BACK_LATER: tuple[type[Exception], ...] = (LeaseHeld, *REDIS_DOWN)
_models: OrderedDict[str, FoundationModel] = OrderedDict()
_adapters: dict[str, Any] = {}
_store: Store | None = None


def store() -> Store:
    global _store
    if _store is None:
        settings = get_settings()
        redis = connect_redis(
            settings.redis_url,
            timeout_s=max(settings.redis_timeout_s, 10),
            cluster=settings.redis_cluster,
        )
        _store = Store(redis, write_batch=settings.write_batch)
    return _store


def load_model(name: str) -> FoundationModel:
    """A registered model, kept loaded: a worker process serves many stages of the same job."""
    if name not in _models:
        checkpoint = store().get_model(name)["checkpoint"]
        settings = get_settings()
        while len(_models) >= settings.model_cache_size:
            _models.popitem(last=False)
        _models[name] = FoundationModel.load(checkpoint, device=settings.device)
    _models.move_to_end(name)
    return _models[name]


class Job:
    """One job's record and controls as a stage sees them."""

    def __init__(self, job_id: str, *, settings: Settings | None = None) -> None:
        self.id = job_id
        self.store = store()
        self.settings = settings or get_settings()
        self.record = self.store.get_job(job_id)
        self._last_check = 0.0
        self._last_progress = 0.0

    @property
    def target(self) -> tuple[str, str]:
        return self.record["target"]["model"], self.record["target"]["version"]

    @property
    def request(self) -> dict[str, Any]:
        return dict(self.record["request"])

    def update(self, **fields: Any) -> None:
        self.store.update_job(self.id, **fields)
        self.record.update(fields)

    def should_stop(self) -> bool:
        now = time.monotonic()
        if now - self._last_check < 0.25:
            return False
        self._last_check = now
        return self.store.cancel_requested(self.id)

    def check_cancel(self) -> None:
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


def run_guarded(job_id: str, stage: Callable[[Job], Any], *, lease: str | None = None) -> Any:
    """Run a stage, under its ``lease`` when named (see workers.lease); turn cancellation and
    bad input into a terminal job state."""
    try:
        job = Job(job_id)
    except NotFoundError:
        return None  # the job record was removed; nothing to do
    if job.record["state"] in TERMINAL:
        return None
    try:
        job.check_cancel()
        if job.record["state"] != RUNNING:
            job.update(state=RUNNING, started_at=time.time())
        if lease is None:
            return stage(job)
        with held(job.store, job.id, lease, ttl_s=job.settings.lease_ttl_s):
            job.record = job.store.get_job(job.id)  # the last holder may have finished the job
            return None if job.record["state"] in TERMINAL else stage(job)
    except Cancelled:
        abandon(job)
    except (MigrationError, ServiceError) as exc:
        abandon(job, error=str(exc))
    except _COME_BACK_LATER:
        raise  # transient: the task is retried, the job stays as it is
    except Exception as exc:
        abandon(job, error=f"internal error: {exc!r}")
        raise
    return None


def abandon(job: Job, *, error: str | None = None) -> None:
    """Drop the unsealed target set; the active set is never touched."""
    model, version = job.target
    try:
        meta = job.store.get_meta(model, version)
        if meta.state != SEALED:
            job.store.delete_set(model, version)
    except ServiceError:
        pass
    state = CANCELLED if error is None else FAILED
    job.update(state=state, stage=state, error=error, finished_at=time.time())


# ---- data ---------------------------------------------------------------------------------------


def dataset_source(name: str) -> str:
    spec = store().get_dataset(name)
    return str(spec["path"]) if spec else name


def load_splits(job: Job, *, task: str, users: list[str] | None = None) -> Splits:
    request = job.request
    interactions = load_interactions(
        dataset_source(request["dataset"]),
        task=task,
        max_users=request.get("max_users") if users is None else None,
        seed=int(request.get("seed", 0)),
    )
    splits = split_chronological(
        interactions, max_train=int(request.get("max_train_per_user") or 30)
    )
    return splits if users is None else splits.restrict(users)


def load_set(
    model: str,
    version: str,
    *,
    users: list[str] | None = None,
    db: Store | None = None,
    skip_missing: bool = False,
) -> PromptSet:
    """The stored set, or its ``users``; with ``skip_missing``, users without a prompt (erased
    since they were planned) are left out instead of failing the load."""
    s = db or store()
    meta = s.get_meta(model, version)
    users = users if users is not None else s.set_users(model, version)
    values = s.get_prompts(model, version, users)
    missing = [u for u, v in zip(users, values, strict=True) if v is None]
    if missing and not skip_missing:
        raise DataError(f"{model} version {version} has no prompt for users {missing[:5]}.")
    found = [(u, v) for u, v in zip(users, values, strict=True) if v is not None]
    shape = tuple(meta.shape)
    rows = [codec.decode(v, dtype=meta.dtype, shape=shape) for _, v in found]
    prompts = torch.from_numpy(np.stack(rows)) if rows else torch.zeros((0, *shape))
    head = load_tensors(s.get_head(model, version))
    return PromptSet(model, meta.task, [u for u, _ in found], prompts, head)


def write_set(
    job: Job, prompt_set: PromptSet, *, meta: SetMeta, metrics: dict[str, Any]
) -> SetMeta:
    """Write a complete set into its version namespace, verify it and seal it."""
    items = encode_rows(prompt_set.user_ids, prompt_set.prompts, dtype=meta.dtype)
    return job.store.write_complete_set(
        meta, head=save_tensors(prompt_set.head), batches=[items], metrics=metrics
    )


def encode_rows(
    users: list[str], prompts: torch.Tensor, *, dtype: str = "float32"
) -> list[tuple[str, bytes]]:
    array = prompts.detach().float().cpu().numpy()
    return [(u, codec.encode(array[i], dtype)) for i, u in enumerate(users)]


def common_users(sources: list[dict[str, str]]) -> list[str]:
    sets = [set(store().set_users(s["model"], s["version"])) for s in sources]
    return sorted(set.intersection(*sets))


def source_task(sources: list[dict[str, str]]) -> Task:
    tasks = {store().get_meta(s["model"], s["version"]).task for s in sources}
    if len(tasks) != 1:
        raise DataError(f"Sources were trained for different tasks {sorted(tasks)}.")
    return get_task(tasks.pop())


# ---- prompt training ----------------------------------------------------------------------------


def train_prompt_set(job: Job) -> None:

    request, (model_name, version) = job.request, job.target
    task = get_task(request["task"])
    job.update(stage="loading")
    splits = load_splits(job, task=task.name)
    model = load_model(model_name)
    config = PromptTrainingConfig(
        epochs=request["epochs"],
        prompt_length=request["prompt_length"],
        seed=request["seed"],
        **({"lr": request["lr"]} if request.get("lr") else {}),
    )
    job.update(stage="training", users_total=len(splits.users))
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
    job.update(stage="evaluating", fraction=0.85)
    metrics = evaluate(model, task, prompt_set, splits.test)
    job.check_cancel()
    meta = SetMeta(
        model=model_name,
        version=version,
        task=task.name,
        shape=[prompt_set.prompt_length, prompt_set.width],
        dtype=str(request.get("dtype") or "float32"),
        template=task.template.prefix + "<prompt>" + task.template.suffix,
        lineage={"job": job.id, "kind": "train", "dataset": request["dataset"], "parents": []},
    )
    job.update(stage="writing", fraction=0.95)
    write_set(job, prompt_set, meta=meta, metrics={"test": metrics})
    if request.get("activate", True):
        job.store.activate(model_name, version)
    cost = {
        "train_seconds": round(result.seconds, 3),
        "example_passes": result.example_passes,
        "users_trained": len(prompt_set.user_ids),
    }
    job.update(
        state=SUCCEEDED,
        stage="done",
        fraction=1.0,
        users_mapped=len(prompt_set.user_ids),
        metrics={"test": metrics},
        cost=cost,
        finished_at=time.time(),
    )


# ---- migration ----------------------------------------------------------------------------------


def prepare_and_train(job: Job) -> int:
    """Select users, train the adapter (once), plan the chunks; returns the chunk count."""
    sources = job.record["sources"]
    task = source_task(sources)
    users = common_users(sources)
    if not users:
        raise DataError("The source prompt sets share no users; nothing to migrate.")
    job.update(stage="loading", users_total=len(users))
    splits = load_splits(job, task=task.name, users=users)
    if job.store.get_blob(job.id, "adapter") is None:
        # One read of every user's prompts serves both stages: selection clusters the users with
        # training data, training standardises by the whole population the adapter will map.
        sets = [load_set(s["model"], s["version"], users=users) for s in sources]
        if job.request.get("method") == "instant":
            fit_map(job, sources=sources, sets=sets, task=task, splits=splits)
        else:
            settings = job_recipe(job, sets=sets)
            selected = select(job, sets=sets, splits=splits, config=settings.selection)
            train(job, sources=sources, sets=sets, task=task, splits=splits, selected=selected,
                  config=settings.adapter)  # fmt: skip
    return plan_mapping(job, sources=sources, users=users, task=task)


def job_recipe(job: Job, *, sets: list[PromptSet]) -> recipe.Resolved:
    """The measured recipe fitted to this job's population, with what its request names; the
    job's record shows every setting and what the population-dependent rules chose."""
    resolved = recipe_for_request(job.request, sets=sets)
    job.update(recipe=resolved.record())
    return resolved


def recipe_for_request(request: dict[str, Any], *, sets: list[PromptSet]) -> recipe.Resolved:
    """``request``'s adapter and selection options over the recipe, for the users of ``sets``."""
    selection = request["selection"]
    population = recipe.Population(
        users=len(sets[0].user_ids), prompt_length=sets[0].prompt_length,
        features=sum(s.width for s in sets),
        budget=None if selection["strategy"] == "all" else selection.get("budget"),
    )  # fmt: skip
    return recipe.resolve(population, adapter=request["adapter"],
                          selection={"post_stratify": selection.get("post_stratify")},
                          seed=int(request.get("seed", 0)))  # fmt: skip


def select(
    job: Job, *, sets: list[PromptSet], splits: Splits, config: SelectionConfig
) -> Selection:
    """The users who train the adapter and their loss weights, stored once: a redelivered
    stage trains on the same users."""
    stored = job.store.get_blob(job.id, "selected")
    if stored is not None:
        return Selection(json.loads(stored))  # user -> loss weight, in selection order
    job.update(stage="selecting")
    trainable = [u for u in sets[0].user_ids if u in splits.train]
    selection = job.request["selection"]
    chosen = select_users(
        selection["strategy"],
        prompts=stack_sources(sets, trainable),
        labels=splits.train_labels(),
        user_ids=trainable,
        budget=selection.get("budget"),
        seed=int(job.request.get("seed", 0)),
        config=config,
    )
    job.store.put_blob(job.id, "selected", json.dumps(chosen.weights).encode())
    return chosen


def _vocab_maps(sources: list[dict[str, str]], target: FoundationModel) -> list[Any] | None:

    try:
        return [fit_vocab_map(load_model(s["model"]), target) for s in sources]
    except DataError:
        return None  # too few shared tokens: the adapter starts from scratch


def fit_map(
    job: Job, *, sources: list[dict[str, str]], sets: list[PromptSet], task: Task, splits: Splits
) -> None:
    """The data-free map, stored as the job's adapter, and the head refitted to read the target:
    no ratings and no training (models.instant.fit_instant)."""
    target_name, _ = job.target
    job.update(stage="fitting", users_selected=0)
    started = time.perf_counter()
    fitted = fit_instant(
        task, sources=sets, source_models=[load_model(s["model"]) for s in sources],
        target=load_model(target_name), item_texts=splits.train_item_texts(),
        seed=int(job.request.get("seed", 0)),
    )  # fmt: skip
    job.store.put_blob(job.id, "head", save_tensors(fitted.head.state))
    job.update(
        cost={
            "train_seconds": 0.0,
            "example_passes": 0,
            "users_trained": 0,
            "fit_seconds": round(time.perf_counter() - started, 3),
            "inference_passes": fitted.head.passes,
        },
    )
    job.store.put_blob(job.id, "adapter", adapter_to_bytes(fitted.linear.as_adapter()))


def train(
    job: Job,
    *,
    sources: list[dict[str, str]],
    sets: list[PromptSet],
    task: Task,
    splits: Splits,
    selected: Selection,
    config: MigrationConfig,
) -> None:
    """Train on the ``selected`` users; ``sets`` hold every user's prompts (input statistics)."""
    target_name, _ = job.target
    job.update(stage="training", users_selected=len(selected.users))
    job.store.count(job.id, "adapter_trainings")
    if job.settings.stage_delay_s:
        time.sleep(job.settings.stage_delay_s)  # test-only: leaves room to kill a worker here
    target = load_model(target_name)
    result = train_adapter(
        sources=sets,
        target=target,
        task=task,
        splits=splits.restrict(selected.users),
        users=selected.users,
        user_weights=selected.weights,
        config=config,
        vocab_maps=_vocab_maps(sources, target) if config.start_from_vocab_map else None,
        source_model=load_model(sources[0]["model"]) if config.distill_weight else None,
        on_progress=job.progress(0.0, 0.5),
        should_stop=job.should_stop,
    )
    job.store.put_blob(job.id, "head", save_tensors(result.head))
    job.update(
        cost={
            "train_seconds": round(result.seconds, 3),
            "example_passes": result.example_passes,
            "users_trained": result.users_trained,
        },
        history=result.history[-20:],
    )
    # Last: its presence tells a re-delivered stage that training is done.
    job.store.put_blob(job.id, "adapter", adapter_to_bytes(result.adapter))


def train_and_dispatch(job: Job, *, dispatch: Callable[[int], None]) -> None:
    """``prepare_and_train``, then ``dispatch`` the chunk tasks once: a later delivery of the
    stage (its lease keeps it after this one) finds them sent and sends no second set."""
    chunks = prepare_and_train(job)
    if job.record.get("mapping_dispatched"):
        return
    dispatch(chunks)
    job.update(mapping_dispatched=True)


def plan_mapping(job: Job, *, sources: list[dict[str, str]], users: list[str], task: Task) -> int:
    model, version = job.target
    plan = job.store.get_blob(job.id, "plan")
    if plan is None:
        job.update(users_planned=len(users))
        plan = json.dumps(_split_chunks(job, users)).encode()
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


def _chunks(job: Job) -> list[list[str]]:
    return list(json.loads(job.store.get_blob(job.id, "plan") or b"[]"))


def _split_chunks(job: Job, users: list[str]) -> list[list[str]]:
    size = int(job.request.get("chunk_size") or job.settings.chunk_size)
    return [users[i : i + size] for i in range(0, len(users), size)]


def map_late_users(job: Job, *, rounds: int = 3) -> None:
    """Map the users onboarded onto every source since the plan was made, as extra chunks.

    Without this, promoting the new set would leave those users without a prompt on the model
    they are served from. It runs while the set is still being written, so an erasure racing it
    leaves a tombstone that sealing honours. Users onboarded onto a source after the last round
    (or after sealing) have to be onboarded onto the new set as well.
    """
    for _ in range(rounds):
        chunks = _chunks(job)
        planned = {user for chunk in chunks for user in chunk}
        late = [u for u in common_users(job.record["sources"]) if u not in planned]
        if not late:
            return
        plan = [*chunks, *_split_chunks(job, late)]
        job.store.put_blob(job.id, "plan", json.dumps(plan).encode())
        job.update(users_total=len(planned) + len(late))
        _map_missing_chunks(job)


def _map_missing_chunks(job: Job) -> None:
    """Map, here, every chunk of the plan not done yet (one a lost chord message never ran, or
    one added after the chord)."""
    done = job.store.chunks_done(job.id)
    for index in range(len(_chunks(job))):
        if index not in done:  # map_chunk checks again: a chord task may finish it meanwhile
            job.check_cancel()
            # A chunk task still on it holds the lease: finalize then comes back later.
            with held(job.store, job.id, f"chunk:{index}", ttl_s=job.settings.lease_ttl_s):
                map_chunk(job, index)


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
        time.sleep(job.settings.chunk_delay_s)  # test-only: leaves room to kill a worker here
    sets = [
        load_set(s["model"], s["version"], users=_chunks(job)[index], skip_missing=True)
        for s in job.record["sources"]
    ]
    users = users_in_every_set(sets)  # an erasure since planning leaves a user out
    mapped = map_prompts(_adapter(job), stack_sources(sets, users))
    items = encode_rows(users, mapped, dtype=str(job.request.get("dtype") or "float32"))
    model, version = job.target
    job.store.write_prompts(model, version, items)
    if job.store.mark_chunk_done(job.id, index, count=len(items), digest=codec.set_digest(items)):
        job.store.add_seconds(job.id, "map_seconds", time.perf_counter() - started)
    done = job.store.chunks_done(job.id)
    mapped_users = sum(count for count, _ in done.values())
    total = max(1, int(job.record.get("users_total") or 1))
    job.update(fraction=round(0.5 + 0.4 * mapped_users / total, 4))
    return {"chunk": index, "users": len(items), "seconds": time.perf_counter() - started}


def finalize(job: Job) -> None:
    """Verify, evaluate, gate, seal and (maybe) promote; safe to run more than once (its
    task holds a lease, so never twice at once)."""

    _map_missing_chunks(job)
    chunks = _chunks(job)
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
    planned = sum(len(chunk) for chunk in _chunks(job))
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
