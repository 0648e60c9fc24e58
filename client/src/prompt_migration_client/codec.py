"""Prompt values on the wire and in Redis: raw little-endian fp32/fp16 bytes, sha256 digests.

The service stores and serves exactly these bytes, and imports this module to write them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

from prompt_migration_client.errors import FormatError

DTYPES: dict[str, str] = {"float32": "<f4", "float16": "<f2"}


def numpy_dtype(dtype: str) -> np.dtype:
    if dtype not in DTYPES:
        raise FormatError(f"Unknown dtype {dtype!r}; use one of {sorted(DTYPES)}.")
    return np.dtype(DTYPES[dtype])


def encode(values: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(values, dtype=numpy_dtype(dtype)).tobytes()


def decode(data: bytes, *, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    array = np.frombuffer(data, dtype=numpy_dtype(dtype))
    return array.reshape(shape).astype(np.float32)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_MOD = 1 << 256


def user_digest(user: str, value: bytes | memoryview) -> int:
    """sha256(user, NUL, value) as an integer (hashed in place: a value is not copied)."""
    hashed = hashlib.sha256(user.encode())
    hashed.update(b"\0")
    hashed.update(value)
    return int.from_bytes(hashed.digest(), "big")


def set_digest(items: Iterable[tuple[str, bytes | memoryview]]) -> str:
    """Digest of a whole prompt set, independent of order: the sum of per-user hashes mod 2^256.

    Being additive, chunks written by different workers combine without re-reading anything.
    """
    return f"{sum(user_digest(u, v) for u, v in items) % _MOD:064x}"


def combine_digests(digests: Iterable[str]) -> str:
    return f"{sum(int(d, 16) for d in digests) % _MOD:064x}"


def digest_without(digest: str, items: Iterable[tuple[str, bytes]]) -> str:
    """The set digest once ``items`` are taken out, without hashing the rest again."""
    return f"{(int(digest, 16) - int(set_digest(items), 16)) % _MOD:064x}"


def check_prompt(
    array: np.ndarray, *, shape: tuple[int, ...], dtype: str = "float32"
) -> np.ndarray:
    """Validate an uploaded prompt: the set's shape, finite values that fit the dtype."""
    if tuple(array.shape) != tuple(shape):
        raise FormatError(
            f"Prompt has shape {list(array.shape)} but this prompt set stores {list(shape)} "
            "(prompt_length x hidden_size); send exactly that shape."
        )
    if not np.isfinite(array).all():
        raise FormatError("Prompt contains NaN or Inf; send finite values only.")
    limit = float(np.finfo(numpy_dtype(dtype)).max)
    if np.abs(array).max(initial=0.0) > limit:
        raise FormatError(f"Prompt values exceed the {dtype} range (|x| <= {limit:g}).")
    return array.astype(np.float32)
