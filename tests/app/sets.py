"""Sealed prompt sets of the tiny models, written through the store as workers write them."""

from __future__ import annotations

import time

import numpy as np
import torch
from prompt_migration_client import codec
from safetensors.torch import save as save_tensors

from app.store import SetMeta, Store
from models.tasks import get_task
from models.tiny import TINY_SPECS


def tiny_width(model: str) -> int:
    return int(TINY_SPECS[model][1]["hidden_size"])


def model_set(
    store: Store,
    *,
    model: str = "tiny-gemma",
    users: list[str] | None = None,
    task: str = "rating",
    length: int = 1,
    seed: int = 0,
    activate: bool = True,
    metrics: dict[str, object] | None = None,
) -> tuple[str, dict[str, np.ndarray]]:
    """A sealed set of ``model`` with a real task head; returns its version and the prompts."""
    if model not in {m["name"] for m in store.list_models()}:
        spec = {
            "name": model,
            "checkpoint": model,
            "hidden_size": tiny_width(model),
            "registered_at": time.time(),
        }
        store.put_model(model, spec)
    users = users or ["u1", "u2", "u3"]
    rng = np.random.default_rng(seed)
    prompts = {u: rng.normal(size=(length, tiny_width(model))).astype(np.float32) for u in users}
    template = get_task(task).template
    version = store.allocate_version(model)
    meta = SetMeta(
        model=model,
        version=version,
        task=task,
        shape=[length, tiny_width(model)],
        template=template.prefix + "<prompt>" + template.suffix,
        lineage={"kind": "train", "job": "test", "parents": []},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = get_task(task).make_head(mean_target=3.5, seed=seed)
        for parameter in head.parameters():  # a head that is not its initial one
            parameter.data.add_(torch.randn_like(parameter) * 0.1)
    items = [(u, codec.encode(v, "float32")) for u, v in prompts.items()]
    store.write_complete_set(
        meta,
        head=save_tensors(head.state_dict()),
        batches=[items],
        metrics=metrics or {"test": {"rmse": 1.0}},
    )
    if activate:
        store.activate(model, version)
    return version, prompts
