"""A sealed prompt set's published inference contract (the bundle) and its head weights.

A sealed set never changes what the bundle describes (checkpoint, task, template, shape, dtype,
head, lineage, metrics), so it is served with a strong ETag and as immutable. The set's count and
digest do change (onboarding, erasure) and are left out. The checkpoint's tokenizer and facts are
read once per process.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from prompt_migration_client.contract import CONTRACT_VERSION, RAW
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from app.errors import ConflictError
from app.store import SEALED, SetMeta, Store
from models.checkpoints import resolve_checkpoint
from models.contract import CheckpointFacts, checkpoint_facts, describe
from models.tasks import get_task


@dataclass(frozen=True)
class PublishedBundle:
    doc: dict[str, Any]
    etag: str
    head: bytes
    head_etag: str


@lru_cache(maxsize=8)
def checkpoint_view(checkpoint: str) -> tuple[PreTrainedTokenizerBase, CheckpointFacts]:
    """The tokenizer and facts of a registered checkpoint (read once: a tokenizer takes seconds)."""
    path = resolve_checkpoint(checkpoint)
    return AutoTokenizer.from_pretrained(path), checkpoint_facts(path)


def head_tensors(head: bytes) -> dict[str, dict[str, Any]]:
    """Name -> shape and dtype of each tensor in a head's safetensors bytes."""
    size = int.from_bytes(head[:8], "little")
    header = json.loads(head[8 : 8 + size])
    return {
        name: {"shape": entry["shape"], "dtype": entry["dtype"]}
        for name, entry in sorted(header.items())
        if name != "__metadata__"
    }


def paths(model: str, version: str) -> dict[str, str]:
    base = f"/models/{model}/versions/{version}"
    return {
        "bundle": f"{base}/bundle",
        "head": f"{base}/head",
        "export": f"{base}/export",
        "prompt": f"/users/{{user_id}}/prompt?model={model}&version={version}",
        "batch": "/prompts/batch",
    }


def build(store: Store, meta: SetMeta) -> PublishedBundle:
    spec = store.get_model(meta.model)
    head = store.get_head(meta.model, meta.version)
    tokenizer, facts = checkpoint_view(str(spec["checkpoint"]))
    ml = describe(task=get_task(meta.task), tokenizer=tokenizer, facts=facts, model_name=meta.model)
    head_sha = hashlib.sha256(head).hexdigest()
    doc = {
        "contract_version": CONTRACT_VERSION,
        "model": meta.model,
        "version": meta.version,
        "checkpoint": {"name": spec["checkpoint"], **facts.public()},
        "task": ml["task"],
        "template": ml["template"],
        "prompt": {
            "length": int(meta.shape[0]),
            "hidden_size": int(meta.shape[1]),
            "shape": list(meta.shape),
            "dtype": meta.dtype,
            "byte_order": "little",
            "space": RAW,
        },
        "scale": ml["scale"],
        "head": {
            **ml["head"],
            "format": "safetensors",
            "sha256": head_sha,
            "tensors": head_tensors(head),
        },
        "lineage": meta.lineage,
        "metrics": meta.metrics,
        "created_at": meta.created_at,
        "sealed_at": meta.sealed_at,
        "paths": paths(meta.model, meta.version),
    }
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return PublishedBundle(
        doc=doc,
        etag=f'"bundle-{hashlib.sha256(canonical).hexdigest()[:32]}"',
        head=head,
        head_etag=f'"head-{head_sha[:32]}"',
    )


def published(store: Store, model: str, version: str) -> PublishedBundle:
    """The bundle of a sealed set: 404 naming what exists, 409 while the set is unsealed."""
    meta = store.require_version(model, version)
    if meta.state != SEALED:
        raise ConflictError(
            f"{model} version {version} is {meta.state}, not sealed: its bundle is published "
            "once the set is sealed. Wait for the job that writes it to finish."
        )
    return build(store, meta)
