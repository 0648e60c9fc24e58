"""The answer of a batch read, in its two encodings: JSON with base64 values (the default) and
safetensors (one ``[n, l, d]`` tensor, for inference servers that want no base64).

The service builds both straight from the values Redis returned, without a validation pass, and
the client parses them here.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from prompt_migration_client import codec


class SetShape(Protocol):
    """What an answer says of the set it was read from."""

    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def shape(self) -> list[int]: ...
    @property
    def dtype(self) -> str: ...


@dataclass(frozen=True)
class Batch:
    """Prompts of many users from one version: ``prompts`` user -> ``[l, d]`` float32."""

    model: str
    version: str
    prompts: dict[str, np.ndarray]
    missing: list[str] = field(default_factory=list)


def found_values(users: list[str], values: list[bytes | None]) -> dict[str, bytes]:
    """The users that have a value, once each, in request order."""
    found: dict[str, bytes] = {}
    for user, value in zip(users, values, strict=True):
        if value:
            found[user] = value
    return found


def batch_json(meta: SetShape, users: list[str], found: dict[str, bytes]) -> bytes:
    """The JSON answer: model, version, shape, dtype, ``prompts`` user -> base64, ``missing``.

    ``prompts`` is joined by hand: user ids match the id rule (``ids.USER_ID_PATTERN``) and base64
    uses A-Z a-z 0-9 + / =, so neither needs JSON escaping; the rest goes through json.
    """
    head = {
        "model": meta.model,
        "version": meta.version,
        "shape": meta.shape,
        "dtype": meta.dtype,
        "encoding": "base64",
    }
    parts = [json.dumps(head, separators=(",", ":")).encode()[:-1], b',"prompts":{']
    for user, value in found.items():
        parts += (b'"', user.encode(), b'":"', binascii.b2a_base64(value, newline=False), b'",')
    if found:
        parts[-1] = b'"'  # no comma after the last entry
    missing = [u for u in users if u not in found]
    parts += (b'},"missing":', json.dumps(missing, separators=(",", ":")).encode(), b"}")
    return b"".join(parts)


def batch_safetensors(meta: SetShape, users: list[str], found: dict[str, bytes]) -> bytes:
    """A safetensors file: ``prompts`` ``[n_found, l, d]`` in the set's dtype, rows in the order
    of the ``users`` metadata (a JSON list); ``missing``, ``model``, ``version`` alongside."""
    prompts = np.frombuffer(b"".join(found.values()), dtype=codec.numpy_dtype(meta.dtype))
    missing = [u for u in users if u not in found]
    metadata = {
        "model": meta.model,
        "version": meta.version,
        "users": json.dumps(list(found)),
        "missing": json.dumps(missing),
    }
    return save_safetensors({"prompts": prompts.reshape(len(found), *meta.shape)}, metadata)


def parse_json(body: dict[str, Any]) -> Batch:
    """A :class:`Batch` from the JSON answer (parsed)."""
    dtype, shape = str(body["dtype"]), tuple(body["shape"])
    prompts = {
        user: codec.decode(base64.b64decode(text), dtype=dtype, shape=shape)
        for user, text in body["prompts"].items()
    }
    return Batch(str(body["model"]), str(body["version"]), prompts, list(body["missing"]))


def parse_safetensors(data: bytes) -> Batch:
    """A :class:`Batch` from the safetensors answer."""
    metadata = _metadata(data)
    rows = np.asarray(load_safetensors(data)["prompts"], dtype=np.float32)
    prompts = {user: rows[i] for i, user in enumerate(json.loads(metadata["users"]))}
    missing = list(json.loads(metadata["missing"]))
    return Batch(metadata["model"], metadata["version"], prompts, missing)


def _metadata(data: bytes) -> dict[str, str]:
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}
