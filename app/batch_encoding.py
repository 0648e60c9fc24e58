"""The two encodings of a batch read: JSON with base64 values (the default) and safetensors.

Both are built directly from the values Redis returned, without a validation pass: JSON for
any HTTP client, safetensors for inference servers that want one ``[n, l, d]`` tensor and no
base64 (bench/README.md, "Serving", has what each costs).
"""

from __future__ import annotations

import binascii
import json

import numpy as np
from safetensors.numpy import save as save_safetensors

from app import codec
from app.store import SetFormat


def found_values(users: list[str], values: list[bytes | None]) -> dict[str, bytes]:
    """The users that have a value, once each, in request order."""
    found: dict[str, bytes] = {}
    for user, value in zip(users, values, strict=True):
        if value:
            found[user] = value
    return found


def batch_json(meta: SetFormat, users: list[str], found: dict[str, bytes]) -> bytes:
    """``BatchOut`` as JSON bytes.

    ``prompts`` is joined by hand: user ids match USER_ID_PATTERN (BatchRequest.checked_ids) and
    base64 uses A-Z a-z 0-9 + / =, so neither needs JSON escaping; the rest goes through json.
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


def batch_safetensors(meta: SetFormat, users: list[str], found: dict[str, bytes]) -> bytes:
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
