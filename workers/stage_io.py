"""What the stages read and write: prompt sets, a job's data splits and its encoded rows."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from prompt_migration_client import codec
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from app.store import SetMeta, Store
from models.data import Splits, load_interactions, split_chronological
from models.errors import DataError
from models.prompts import PromptSet
from models.tasks import Task, get_task
from workers.context import JobRun, store


def dataset_source(name: str) -> str:
    spec = store().get_dataset(name)
    return str(spec["path"]) if spec else name


def load_splits(job: JobRun, *, task: str, users: list[str] | None = None) -> Splits:
    spec = job.spec
    interactions = load_interactions(
        dataset_source(spec.dataset),
        task=task,
        max_users=spec.max_users if users is None else None,
        seed=spec.seed,
    )
    splits = split_chronological(interactions, max_train=spec.max_train_per_user)
    return splits if users is None else splits.restrict(users)


def load_set(
    model: str,
    version: str,
    *,
    users: list[str] | None = None,
    db: Store | None = None,
    skip_missing: bool = False,
) -> PromptSet:
    """The stored set, or its ``users`` (the stages name a bounded sample or one chunk); with
    ``skip_missing``, users without a prompt (erased since they were planned) are left out
    instead of failing the load."""
    s = db or store()
    meta = s.get_meta(model, version)
    users = users if users is not None else s.set_users(model, version)
    values = s.read_values(model, version, users)
    missing = [u for u, v in zip(users, values, strict=True) if v is None]
    if missing and not skip_missing:
        raise DataError(f"{model} version {version} has no prompt for users {missing[:5]}.")
    found = [(u, v) for u, v in zip(users, values, strict=True) if v is not None]
    shape = (len(found), *meta.shape)
    data = np.frombuffer(b"".join(v for _, v in found), dtype=codec.numpy_dtype(meta.dtype))
    prompts = torch.from_numpy(data.reshape(shape).astype(np.float32))
    head = load_tensors(s.get_head(model, version))
    return PromptSet(model, meta.task, [u for u, _ in found], prompts, head)


def write_set(
    job: JobRun, prompt_set: PromptSet, *, meta: SetMeta, metrics: dict[str, Any]
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


def source_task(sources: list[dict[str, str]]) -> Task:
    tasks = {store().get_meta(s["model"], s["version"]).task for s in sources}
    if len(tasks) != 1:
        raise DataError(f"Sources were trained for different tasks {sorted(tasks)}.")
    return get_task(tasks.pop())
