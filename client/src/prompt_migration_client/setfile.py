"""A whole prompt set as one safetensors file: the bulk export and import format.

Tensors, in this order in the file:

- ``prompts``  ``[N, l, d]`` F32 or F16, little-endian: row ``i`` is user ``i``'s prompt;
- ``present``  ``[N]`` U8: 0 marks a row whose user was erased while the file was written (its
  prompt is zeros and an import skips it);
- ``user_ids`` ``[N, L]`` U8: each user id in ASCII, zero-padded to the longest;
- ``head.<name>`` F32: the task head's tensors (absent when the file carries no head).

``__metadata__`` holds ``format`` (``prompt-migration/prompt-set``), ``format_version``, ``task``,
``space`` (``raw_embedding_table`` or ``model_input``: see ``contract.SPACES``), ``bundle`` (the
set's published contract, JSON) and, for files converted from other formats, ``source_format``
and ``placement``. The header is written first, so an export streams row by row.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prompt_migration_client.errors import FormatError

FORMAT, FORMAT_VERSION = "prompt-migration/prompt-set", "1"
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16"}
_NUMPY = {"F32": "<f4", "F16": "<f2", "U8": "u1"}
_MAX_HEADER = 100_000_000  # what the safetensors library itself accepts
_MAX_DIM = 2**63 - 1  # numpy's (and safetensors') sizes are signed 64-bit


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str  # safetensors dtype: F32, F16, U8
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:  # Python ints: a crafted shape cannot wrap around
        return math.prod(self.shape) * np.dtype(_NUMPY[self.dtype]).itemsize


def header_bytes(entries: list[Entry], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and the JSON header of a file holding ``entries`` in this order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    at = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [at, at + entry.nbytes],
        }
        at += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keeps the data 8-byte aligned, as safetensors does
    return len(text).to_bytes(8, "little") + text


def encode_ids(users: list[str]) -> tuple[bytes, int]:
    """User ids as an ``[N, L]`` zero-padded ASCII block, and ``L``."""
    width = max((len(u) for u in users), default=1) or 1
    return b"".join(u.encode("ascii").ljust(width, b"\0") for u in users), width


def write_setfile(
    path: Path,
    *,
    prompts: np.ndarray,
    users: list[str],
    metadata: dict[str, str],
    head: dict[str, np.ndarray] | None = None,
) -> Path:
    """A set file from arrays in memory: ``prompts`` ``[N, l, d]`` float32 or float16."""
    dtype = {np.dtype("float32"): "F32", np.dtype("float16"): "F16"}[prompts.dtype]
    ids, width = encode_ids(users)
    head = head or {}
    entries = [
        Entry("prompts", dtype, tuple(prompts.shape)),
        Entry("present", "U8", (len(users),)),
        Entry("user_ids", "U8", (len(users), width)),
        *(Entry(f"head.{k}", "F32", tuple(v.shape)) for k, v in head.items()),
    ]
    with path.open("wb") as out:
        out.write(
            header_bytes(entries, {"format": FORMAT, "format_version": FORMAT_VERSION} | metadata)
        )
        out.write(np.ascontiguousarray(prompts).astype(prompts.dtype.newbyteorder("<")).tobytes())
        out.write(bytes([1]) * len(users))
        out.write(ids)
        for tensor in head.values():
            out.write(np.ascontiguousarray(tensor, dtype="<f4").tobytes())
    return path


@dataclass(frozen=True)
class SetFile:
    """A set file on disk, its header checked; tensors are read lazily (memory-mapped)."""

    path: Path
    metadata: dict[str, str]
    entries: dict[str, dict[str, Any]]
    data_start: int

    def array(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        start, end = entry["data_offsets"]
        count = (end - start) // np.dtype(_NUMPY[entry["dtype"]]).itemsize
        if count == 0:
            return np.zeros(entry["shape"], dtype=_NUMPY[entry["dtype"]])
        return np.memmap(
            self.path,
            dtype=_NUMPY[entry["dtype"]],
            mode="r",
            offset=self.data_start + start,
            shape=tuple(entry["shape"]),
        )

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of a tensor, read rather than mapped: the memory is the block's
        and goes with it, so a pass over a file of any size holds one block."""
        entry = self.entries[name]
        shape = tuple(entry["shape"])
        start, stop = max(0, start), min(stop, shape[0] if shape else 0)
        dtype = np.dtype(_NUMPY[entry["dtype"]])
        per_row = math.prod(shape[1:])
        if stop <= start:
            return np.zeros((0, *shape[1:]), dtype=dtype)
        offset = self.data_start + entry["data_offsets"][0] + start * per_row * dtype.itemsize
        with self.path.open("rb") as handle:
            handle.seek(offset)
            block = np.fromfile(handle, dtype=dtype, count=(stop - start) * per_row)
        return block.reshape((stop - start, *shape[1:]))

    @property
    def prompts(self) -> np.ndarray:  # [N, l, d]
        return self.array("prompts")

    @property
    def dtype(self) -> str:
        return {v: k for k, v in SAFETENSORS_DTYPES.items()}[self.entries["prompts"]["dtype"]]

    def present(self) -> np.ndarray:  # [N] bool
        if "present" not in self.entries:
            return np.ones(len(self.prompts), dtype=bool)
        return np.asarray(self.array("present")) != 0

    def user_ids(self, start: int = 0, stop: int | None = None) -> list[str]:
        """The ids of rows ``[start, stop)`` (all by default)."""
        stop = self.entries["user_ids"]["shape"][0] if stop is None else stop
        block = self.rows("user_ids", start, stop)
        return [bytes(row).rstrip(b"\0").decode("ascii", "replace") for row in block]

    def head(self) -> dict[str, np.ndarray]:
        return {
            name[len("head.") :]: np.array(self.array(name))
            for name in self.entries
            if name.startswith("head.")
        }

    def bundle(self) -> dict[str, Any] | None:
        raw = self.metadata.get("bundle")
        if raw is None:
            return None
        try:
            bundle = json.loads(raw)
        except (ValueError, RecursionError) as error:
            raise _refuse(f"its metadata's bundle is not JSON ({error})") from error
        if not isinstance(bundle, dict):
            raise _refuse("its metadata's bundle is not a JSON object")
        return bundle


def _refuse(what: str) -> FormatError:
    return FormatError(
        f"Not a prompt set file: {what}. Export one with GET "
        "/models/{name}/versions/{version}/export (or `prompt-migration "
        "export`) and send it unchanged."
    )


def open_setfile(path: Path) -> SetFile:
    """Parse and check a file's header: known dtypes, shapes that fit their byte ranges, the
    ranges tiling the data exactly."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if size < 8 or length <= 0 or length > min(_MAX_HEADER, size - 8):
            raise _refuse("the first 8 bytes do not give a safetensors header length")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, RecursionError) as error:
            raise _refuse(f"its header is not JSON ({str(error)[:200]})") from error
    if not isinstance(header, dict):
        raise _refuse("its header is not a JSON object")
    raw_metadata = header.pop("__metadata__", None) or {}
    if not isinstance(raw_metadata, dict):
        raise _refuse("its __metadata__ is not a JSON object of strings")
    metadata = {str(k): str(v) for k, v in raw_metadata.items()}
    _check_entries(header, data_size=size - 8 - length)
    return SetFile(path, metadata, header, 8 + length)


def _check_entries(entries: dict[str, Any], *, data_size: int) -> None:
    spans = [_span(name, entry) for name, entry in entries.items()]
    at = 0
    for start, end in sorted(spans):
        if start != at:
            raise _refuse("its tensors leave a gap or overlap in the data")
        at = end
    if at != data_size:
        raise _refuse(f"the data holds {data_size} bytes but its tensors {at}")
    for name, rank in (("present", 1), ("user_ids", 2)):
        if name in entries and len(entries[name]["shape"]) != rank:
            raise _refuse(
                f"tensor {name!r} has shape {entries[name]['shape']}; it must have "
                f"{rank} dimension{'s' if rank > 1 else ''}"
            )
    if "prompts" not in entries or entries["prompts"]["dtype"] not in ("F32", "F16"):
        raise FormatError(
            "The file has no F32 or F16 tensor named 'prompts' [N, l, d]: name the users' "
            "prompts 'prompts', one row per user."
        )


def _is_count(value: object) -> bool:
    return type(value) is int and 0 <= value <= _MAX_DIM  # bool is an int too: refuse it


def _span(name: str, entry: object) -> tuple[int, int]:
    """The byte range of one header entry, refused unless the entry is well formed."""
    if not isinstance(entry, dict):
        raise _refuse(f"tensor {name!r} is not an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _NUMPY:
        raise FormatError(
            f"Tensor {name!r} has dtype {dtype!r}; prompts must be F32 or F16 (convert "
            "them with .float() or .half()), user_ids and present U8, head tensors F32."
        )
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise _refuse(
            f"tensor {name!r} has shape {str(shape)[:80]}; a shape is a list of "
            f"integers from 0 to {_MAX_DIM}"
        )
    nbytes = Entry(name, dtype, tuple(shape)).nbytes
    if nbytes > _MAX_DIM:
        raise _refuse(f"tensor {name!r} of shape {shape} would hold more than {_MAX_DIM} bytes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise _refuse(
            f"tensor {name!r} has data_offsets {str(offsets)[:80]}; give [start, end] "
            "byte offsets into the data"
        )
    if offsets[1] - offsets[0] != nbytes:
        raise _refuse(f"tensor {name!r} of shape {shape} does not fill its byte range")
    return offsets[0], offsets[1]


def chunks(path: Path, *, size: int = 1 << 20) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while block := handle.read(size):
            yield block
