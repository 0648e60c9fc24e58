"""Prompt values on the wire and in Redis: raw little-endian fp32/fp16 bytes, sha256 digests."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

from app.errors import InvalidInputError

DTYPES: dict[str, str] = {"float32": "<f4", "float16": "<f2"}


def numpy_dtype(dtype: str) -> np.dtype:
    if dtype not in DTYPES:
        raise InvalidInputError(f"Unknown dtype {dtype!r}; use one of {sorted(DTYPES)}.")
    return np.dtype(DTYPES[dtype])


def encode(values: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(values, dtype=numpy_dtype(dtype)).tobytes()


def decode(data: bytes, *, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    array = np.frombuffer(data, dtype=numpy_dtype(dtype))
    return array.reshape(shape).astype(np.float32)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def set_digest(items: Iterable[tuple[str, bytes]]) -> str:
    """Order-independent digest of a whole prompt set: sha256 over sorted (user, value digest)."""
    lines = sorted(f"{user}\0{digest(value)}" for user, value in items)
    return combine_digests(lines)


def combine_digests(lines: Iterable[str]) -> str:
    h = hashlib.sha256()
    for line in sorted(lines):
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()


def check_prompt(
    array: np.ndarray, *, shape: tuple[int, ...], dtype: str = "float32"
) -> np.ndarray:
    """Validate an uploaded prompt: the set's shape, finite values that fit the dtype."""
    if tuple(array.shape) != tuple(shape):
        raise InvalidInputError(
            f"Prompt has shape {list(array.shape)} but this prompt set stores {list(shape)} "
            "(prompt_length x hidden_size); send exactly that shape."
        )
    if not np.isfinite(array).all():
        raise InvalidInputError("Prompt contains NaN or Inf; send finite values only.")
    limit = float(np.finfo(numpy_dtype(dtype)).max)
    if np.abs(array).max(initial=0.0) > limit:
        raise InvalidInputError(f"Prompt values exceed the {dtype} range (|x| <= {limit:g}).")
    return array.astype(np.float32)
