"""A set's bundle as the client uses it: typed fields, the head's weights, the head applied.

Built only from the service's answers (the bundle JSON and the head's safetensors bytes); nothing
here imports the service's ML core, so what a consumer computes rests on the contract alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from torch.nn import functional as F

from app.client.errors import ContractError
from app.codec import DTYPES


@dataclass(frozen=True)
class Prompt:
    """One user's prompt as read: ``values`` ``[l, d]`` float32, in the raw table space."""

    user: str
    model: str
    version: str
    values: np.ndarray
    digest: str = ""
    etag: str = ""


@dataclass(frozen=True)
class Bundle:
    """The contract of one sealed set (``doc`` is the service's JSON) and its head weights."""

    doc: dict[str, Any]
    head: dict[str, torch.Tensor]
    etag: str = ""

    @classmethod
    def parse(cls, doc: dict[str, Any], head_bytes: bytes, *, etag: str = "") -> Bundle:
        want = doc["head"]["sha256"]
        if hashlib.sha256(head_bytes).hexdigest() != want:
            raise ContractError(
                f"Head of {doc['model']} version {doc['version']} does not match the bundle's "
                f"sha256 {want[:12]}: fetch both again."
            )
        return cls(doc=doc, head=load_tensors(head_bytes), etag=etag)

    @property
    def model(self) -> str:
        return str(self.doc["model"])

    @property
    def version(self) -> str:
        return str(self.doc["version"])

    @property
    def shape(self) -> tuple[int, int]:
        length, width = self.doc["prompt"]["shape"]
        return int(length), int(width)

    @property
    def dtype(self) -> str:
        return str(self.doc["prompt"]["dtype"])

    @property
    def input_scale(self) -> float:
        return float(self.doc["scale"]["input_scale"])

    @property
    def label_token_ids(self) -> list[int]:
        return [int(i) for i in self.doc["task"]["label_token_ids"]]

    @property
    def suffix_token_ids(self) -> list[int]:
        return [int(i) for i in self.doc["template"]["suffix_token_ids"]]

    def prefix_for(self, item_text: str) -> str:
        template = self.doc["template"]
        return str(template["prefix"]).replace(template["item_placeholder"], item_text)

    def decode(self, raw: bytes) -> np.ndarray:
        """Stored bytes -> ``[l, d]`` float32."""
        if self.dtype not in DTYPES:
            raise ContractError(f"Unknown prompt dtype {self.dtype!r}: upgrade the client.")
        values = np.frombuffer(raw, dtype=DTYPES[self.dtype])
        if values.size != self.shape[0] * self.shape[1]:
            raise ContractError(
                f"A prompt of {values.size} values does not fit {self.model} version "
                f"{self.version}'s shape {list(self.shape)}: read it from that version."
            )
        return values.reshape(self.shape).astype(np.float32)

    def check_prompt(self, values: np.ndarray | torch.Tensor) -> None:
        if tuple(values.shape) != self.shape:
            raise ContractError(
                f"Prompt of shape {list(values.shape)} does not fit {self.model} version "
                f"{self.version} ({list(self.shape)}): read the prompt from that version."
            )

    def apply_head(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, n_labels]`` label logits -> ``[B]`` predictions, by the bundle's head steps."""
        x = logits.float()
        for step in self.doc["head"]["steps"]:
            x = _apply(step, x, self.head)
        return x


def _apply(step: dict[str, Any], x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    op = step["op"]
    if op == "center":
        return x - x.mean(-1, keepdim=True)
    if op == "linear":
        return F.linear(x, weights[step["weight"]].float(), weights[step["bias"]].float())
    if op == "silu":
        return F.silu(x)
    if op == "squeeze":
        return x.squeeze(-1)
    if op == "clamp":
        return x.clamp(float(step["min"]), float(step["max"]))
    if op == "difference":
        return x[:, 1] - x[:, 0]
    if op == "affine":
        return weights[step["scale"]].float() * x + weights[step["bias"]].float()
    if op == "sigmoid":
        return torch.sigmoid(x)
    raise ContractError(f"Unknown head step {op!r} in the bundle: upgrade the client.")
