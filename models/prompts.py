"""Prompt sets: every user's soft prompt for one model, plus the task head trained with them."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors.torch import load, save

from models.errors import InvalidPromptError, ShapeMismatchError

_HEAD_PREFIX = "head."


@dataclass
class PromptSet:
    """``prompts[i]`` ``[l, d]`` (fp32, raw embedding space) belongs to ``user_ids[i]``."""

    model: str
    task: str
    user_ids: list[str]
    prompts: torch.Tensor  # [n_users, l, d]
    head: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        self.validate()

    @property
    def prompt_length(self) -> int:
        return int(self.prompts.shape[1])

    @property
    def width(self) -> int:
        return int(self.prompts.shape[2])

    def validate(self) -> None:
        if self.prompts.ndim != 3 or self.prompts.shape[0] != len(self.user_ids):
            raise ShapeMismatchError(
                f"Prompt tensor of shape {tuple(self.prompts.shape)} does not match "
                f"{len(self.user_ids)} users: expected [n_users, l, d]."
            )
        if len(set(self.user_ids)) != len(self.user_ids):
            raise ShapeMismatchError("A prompt set lists the same user twice: de-duplicate users.")
        if not torch.isfinite(self.prompts).all():
            bad = (~torch.isfinite(self.prompts)).flatten(1).any(1).nonzero().flatten().tolist()
            raise InvalidPromptError(
                f"Prompts of {len(bad)} users hold NaN or Inf (first: "
                f"{[self.user_ids[i] for i in bad[:5]]}): retrain or drop those users."
            )

    def index(self) -> dict[str, int]:
        return {user: row for row, user in enumerate(self.user_ids)}

    def rows(self, users: list[str]) -> torch.Tensor:
        """Prompts of the given users, in that order: ``[len(users), l, d]``."""
        index = self.index()
        missing = [u for u in users if u not in index]
        if missing:
            raise ShapeMismatchError(
                f"{len(missing)} users have no prompt in this set (first: {missing[:5]})."
            )
        return self.prompts[[index[u] for u in users]]

    def subset(self, users: list[str]) -> PromptSet:
        """The same set restricted to ``users``, in that order."""
        return PromptSet(self.model, self.task, list(users), self.rows(users), self.head)

    def to_bytes(self) -> bytes:
        tensors = {"prompts": self.prompts.contiguous()}
        tensors |= {_HEAD_PREFIX + k: v.contiguous() for k, v in self.head.items()}
        meta = {"model": self.model, "task": self.task, "user_ids": json.dumps(self.user_ids)}
        return save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> PromptSet:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len])["__metadata__"]  # safetensors header
        head = {k[len(_HEAD_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_HEAD_PREFIX)}
        return cls(
            meta["model"], meta["task"], json.loads(meta["user_ids"]), tensors["prompts"], head
        )
