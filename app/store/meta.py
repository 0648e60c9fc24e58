"""What the store says of a prompt set: its metadata, its states, and what a reader needs of it."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from app.store.base import as_text

WRITING, SEALED = "writing", "sealed"


@dataclass
class SetMeta:
    model: str
    version: str
    task: str
    shape: list[int]  # [prompt_length, hidden_size] of one user's prompt
    dtype: str = "float32"
    template: str = ""
    lineage: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    state: str = WRITING
    count: int = 0
    digest: str = ""
    sealed_at: float | None = None

    def public(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> SetFormat:
        return SetFormat(self.model, self.version, list(self.shape), self.dtype)


@dataclass(frozen=True)
class SetFormat:
    """What a reader needs of a sealed set: none of it changes once sealed, unlike the set's count
    and digest, which onboarding and erasure keep current, so readers may cache it."""

    model: str
    version: str
    shape: list[int]
    dtype: str


def parse_meta(raw: dict[Any, Any]) -> SetMeta:
    """A set's metadata from its meta hash (the doc, with the state, count and digest fields)."""
    fields = {str(as_text(k)): as_text(v) for k, v in raw.items()}
    meta = SetMeta(**json.loads(str(fields["doc"])))
    meta.state = str(fields.get("state", WRITING))
    meta.count = int(fields.get("count") or 0)
    meta.digest = str(fields.get("digest") or meta.digest)
    return meta
