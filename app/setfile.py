"""A whole prompt set as one safetensors file: the bulk export and import format.

Tensors, in this order in the file:

- ``prompts``  ``[N, l, d]`` F32 or F16, little-endian: row ``i`` is user ``i``'s prompt;
- ``present``  ``[N]`` U8: 0 marks a row whose user was erased while the file was written (its
  prompt is zeros and an import skips it);
- ``user_ids`` ``[N, L]`` U8: each user id in ASCII, zero-padded to the longest;
- ``head.<name>`` F32: the task head's tensors (absent when the file carries no head).

``__metadata__`` holds ``format`` (``prompt-migration/prompt-set``), ``format_version``, ``task``,
``space`` (``raw_embedding_table`` or ``model_input``: see ``models.contract``), ``bundle`` (the
set's published contract, JSON) and, for files converted from other formats, ``source_format``
and ``placement``. The header is written first, so an export streams row by row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import InvalidInputError

FORMAT, FORMAT_VERSION = "prompt-migration/prompt-set", "1"
# The spaces of models.contract, spelled here too so that the client needs no ML core.
RAW, INPUT = "raw_embedding_table", "model_input"
DTYPES = {"float32": "F32", "float16": "F16"}
_NUMPY = {"F32": "<f4", "F16": "<f2", "U8": "u1"}
_MAX_HEADER = 100_000_000  # what the safetensors library itself accepts


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str  # safetensors dtype: F32, F16, U8
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(_NUMPY[self.dtype]).itemsize


def header_bytes(entries: list[Entry], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and the JSON header of a file holding ``entries`` in this order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    at = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [at, at + entry.nbytes]
        }  # fmt: skip
        at += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keeps the data 8-byte aligned, as safetensors does
    return len(text).to_bytes(8, "little") + text


def encode_ids(users: list[str]) -> tuple[bytes, int]:
    """User ids as an ``[N, L]`` zero-padded ASCII block, and ``L``."""
    width = max((len(u) for u in users), default=1) or 1
    return b"".join(u.encode("ascii").ljust(width, b"\0") for u in users), width


def write_setfile(
    path: Path, *, prompts: np.ndarray, users: list[str], metadata: dict[str, str],
    head: dict[str, np.ndarray] | None = None,
) -> Path:  # fmt: skip
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
        out.write(header_bytes(entries, {"format": FORMAT, "format_version": FORMAT_VERSION}
                               | metadata))  # fmt: skip
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
        return np.memmap(self.path, dtype=_NUMPY[entry["dtype"]], mode="r",
                         offset=self.data_start + start, shape=tuple(entry["shape"]))  # fmt: skip

    @property
    def prompts(self) -> np.ndarray:  # [N, l, d]
        return self.array("prompts")

    @property
    def dtype(self) -> str:
        return {v: k for k, v in DTYPES.items()}[self.entries["prompts"]["dtype"]]

    def present(self) -> np.ndarray:  # [N] bool
        if "present" not in self.entries:
            return np.ones(len(self.prompts), dtype=bool)
        return np.asarray(self.array("present")) != 0

    def user_ids(self) -> list[str]:
        block = np.asarray(self.array("user_ids"))
        return [bytes(row).rstrip(b"\0").decode("ascii", "replace") for row in block]

    def head(self) -> dict[str, np.ndarray]:
        return {
            name[len("head.") :]: np.array(self.array(name))
            for name in self.entries
            if name.startswith("head.")
        }

    def bundle(self) -> dict[str, Any] | None:
        raw = self.metadata.get("bundle")
        return None if raw is None else dict(json.loads(raw))


def _refuse(what: str) -> InvalidInputError:
    return InvalidInputError(f"Not a prompt set file: {what}. Export one with GET "
                             "/models/{name}/versions/{version}/export (or `python -m app.cli "
                             "export`) and send it unchanged.")  # fmt: skip


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
        except ValueError as error:
            raise _refuse(f"its header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise _refuse("its header is not a JSON object")
    metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
    _check_entries(header, data_size=size - 8 - length)
    return SetFile(path, metadata, header, 8 + length)


def _check_entries(entries: dict[str, Any], *, data_size: int) -> None:
    spans = []
    for name, entry in entries.items():
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _NUMPY:
            raise InvalidInputError(
                f"Tensor {name!r} has dtype {dtype!r}; prompts must be F32 or F16 (convert "
                "them with .float() or .half()), user_ids and present U8, head tensors F32."
            )
        nbytes = Entry(name, dtype, tuple(shape)).nbytes
        if not isinstance(offsets, list) or offsets[1] - offsets[0] != nbytes:
            raise _refuse(f"tensor {name!r} of shape {shape} does not fill its byte range")
        spans.append((int(offsets[0]), int(offsets[1])))
    at = 0
    for start, end in sorted(spans):
        if start != at:
            raise _refuse("its tensors leave a gap or overlap in the data")
        at = end
    if at != data_size:
        raise _refuse(f"the data holds {data_size} bytes but its tensors {at}")
    if "prompts" not in entries or entries["prompts"]["dtype"] not in ("F32", "F16"):
        raise InvalidInputError(
            "The file has no F32 or F16 tensor named 'prompts' [N, l, d]: name the users' "
            "prompts 'prompts', one row per user."
        )


def chunks(path: Path, *, size: int = 1 << 20) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while block := handle.read(size):
            yield block
