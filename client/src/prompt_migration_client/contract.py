"""The contract's vocabulary, and a sealed set's bundle as a consumer uses it.

``SPACES`` names where a prompt's vectors live; the service's bundle, its set files and the PEFT
converters use these names. A :class:`Bundle` is built only from the service's answers (the bundle
JSON and the head's safetensors bytes): what a consumer computes rests on the contract alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors.numpy import load as load_tensors

from prompt_migration_client.errors import ContractError
from prompt_migration_client.head import apply_head

CONTRACT_VERSION = 1
# Where a prompt's vectors live. The service stores RAW; transformers' ``inputs_embeds``, vLLM's
# ``prompt_embeds`` and PEFT prompt-tuning adapters hold INPUT (RAW times ``input_scale``).
RAW, INPUT = "raw_embedding_table", "model_input"
SPACES = (RAW, INPUT)


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
    head: dict[str, np.ndarray]
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

    def check_prompt(self, values: Any) -> None:
        """Refuse values (a numpy array or a tensor) whose shape is not this set's."""
        if tuple(values.shape) != self.shape:
            raise ContractError(
                f"Prompt of shape {list(values.shape)} does not fit {self.model} version "
                f"{self.version} ({list(self.shape)}): read the prompt from that version."
            )

    def apply_head(self, logits: Any) -> np.ndarray:
        """``[B, n_labels]`` label logits -> ``[B]`` float32 predictions, by the head's steps."""
        return apply_head(self.doc["head"]["steps"], logits, self.head)
