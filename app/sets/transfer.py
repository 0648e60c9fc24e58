"""Bulk export of a sealed set as one streamed file, and import of such a file as a new version.

Export lists the set's users once and streams their stored bytes in batches: memory stays at one
batch whatever the set's size. Import checks the whole file before anything is stored (width,
dtype, NaN/Inf, user ids, head, the contract it was made under), then writes through the same
write-verify-seal path as the workers (``Store.write_complete_set``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from prompt_migration_client import codec
from prompt_migration_client.contract import INPUT, RAW, SPACES
from prompt_migration_client.setfile import (
    FORMAT,
    FORMAT_VERSION,
    SAFETENSORS_DTYPES,
    Entry,
    SetFile,
    encode_ids,
    header_bytes,
)
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from app.errors import InvalidInputError
from app.sets.bundle import PublishedBundle, checkpoint_view
from app.store import USER_ID_PATTERN, SetMeta, Store
from models.contract import CheckpointFacts
from models.tasks import Task, get_task

# ---- export --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Export:
    length: int  # bytes, for Content-Length
    chunks: Iterator[bytes]


def export(store: Store, bundle: PublishedBundle, *, batch: int = 1000) -> Export:
    """The set of ``bundle`` as a set file (see ``app.setfile``), streamed."""
    model, version = bundle.doc["model"], bundle.doc["version"]
    users = store.set_users(model, version)
    length, width = bundle.doc["prompt"]["shape"]
    dtype = bundle.doc["prompt"]["dtype"]
    ids, id_width = encode_ids(users)
    head = {f"head.{k}": v.float().contiguous() for k, v in load_tensors(bundle.head).items()}
    entries = [
        Entry("prompts", SAFETENSORS_DTYPES[dtype], (len(users), length, width)),
        Entry("present", "U8", (len(users),)),
        Entry("user_ids", "U8", (len(users), id_width)),
        *(Entry(name, "F32", tuple(t.shape)) for name, t in head.items()),
    ]
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": bundle.doc["task"]["name"],
        "space": RAW,
        "bundle": json.dumps(bundle.doc),
    }
    header = header_bytes(entries, metadata)
    total = len(header) + sum(e.nbytes for e in entries)
    row_bytes = entries[0].nbytes // max(1, len(users))

    def stream() -> Iterator[bytes]:
        yield header
        present = bytearray(len(users))
        for start in range(0, len(users), batch):
            values = store.get_prompts(model, version, users[start : start + batch])
            for offset, value in enumerate(values):
                # A user erased since the listing: zeros, flagged absent.
                ok = value is not None and len(value) == row_bytes
                present[start + offset] = int(ok)
            yield b"".join(
                v if v is not None and len(v) == row_bytes else bytes(row_bytes) for v in values
            )
        yield bytes(present)
        yield ids
        for tensor in head.values():
            yield tensor.numpy().astype("<f4").tobytes()

    return Export(total, stream())


# ---- import --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportOptions:
    activate: bool = False
    dtype: str | None = None  # stored dtype; None: the file's
    head_from_version: str | None = None  # reuse this version's head when the file has none
    placement: str | None = None  # "template": the vectors were trained at the template's place


@dataclass(frozen=True)
class Checked:
    """A file that passed every check, and what the new set will be."""

    task: Task
    count: int  # users to store: the file's present rows
    scale: float  # divide by this to reach the stored space
    head: bytes
    lineage: dict[str, Any]
    dtype: str


@dataclass(frozen=True)
class Block:
    """The present rows of one block of the file."""

    rows: np.ndarray  # [n] their row numbers in the file
    users: list[str]
    prompts: np.ndarray  # [n, l, d] float32, in the stored space


def blocks(setfile: SetFile, *, scale: float, size: int = 4096) -> Iterator[Block]:
    """The file's present rows, ``size`` rows of the file at a time: every pass over a file holds
    one block, whatever the number of users."""
    present = setfile.present()
    for start in range(0, len(present), size):
        keep = np.flatnonzero(present[start : start + size])
        if len(keep) == 0:
            continue
        ids = setfile.user_ids(start, start + size)
        prompts = setfile.rows("prompts", start, start + size)[keep]
        yield Block(
            rows=start + keep,
            users=[ids[i] for i in keep],
            prompts=np.asarray(prompts, dtype=np.float32) / scale,
        )


def check(store: Store, model: str, setfile: SetFile, options: ImportOptions) -> Checked:
    """Every refusal of an import, before anything is stored (each a 422 that says what to fix)."""
    spec = store.get_model(model)
    _, facts = checkpoint_view(str(spec["checkpoint"]))
    meta, bundle = setfile.metadata, setfile.bundle()
    if meta.get("format") != FORMAT:
        raise InvalidInputError(
            f"The file's metadata names format {meta.get('format')!r}, not {FORMAT!r}: export "
            "sets with this service, or convert PEFT adapters with the client (prompt_migration_client.peft)."
        )
    task = get_task(meta.get("task") or (bundle or {}).get("task", {}).get("name", ""))
    _check_contract(task, facts, model=model, bundle=bundle, meta=meta, options=options)
    _check_shape(setfile.prompts, facts, model=model)
    count = _check_users(setfile)
    dtype = options.dtype or setfile.dtype
    scale = facts.input_scale if meta.get("space") == INPUT else 1.0
    _check_values(setfile, scale=scale, dtype=dtype)
    head = _head(store, model, task, setfile, options)
    lineage = {
        "kind": "import",
        "format": meta.get("source_format", "prompt-set"),
        "source": _source(bundle, meta),
        "parents": [],
    }
    return Checked(task, count, scale, head, lineage, dtype)


def _check_contract(
    task: Task,
    facts: CheckpointFacts,
    *,
    model: str,
    bundle: dict[str, Any] | None,
    meta: dict[str, str],
    options: ImportOptions,
) -> None:
    """Refuse files whose prompts would silently predict differently here."""
    if meta.get("space") not in SPACES:
        raise InvalidInputError(
            f"The file's space {meta.get('space')!r} is not one of {list(SPACES)}: say whether its "
            "vectors are raw embedding-table rows or already scaled model inputs."
        )
    if bundle is not None:
        if not facts.same_space(bundle.get("checkpoint", {})):
            raise InvalidInputError(
                f"The file's prompts were made for checkpoint {bundle['checkpoint']} but {model} "
                f"is {facts.public()}: their vectors mean nothing to this model. Migrate the set "
                "to it instead (POST /migrations)."
            )
        template = bundle.get("template", {})
        if (template.get("prefix"), template.get("suffix")) != (
            task.template.prefix,
            task.template.suffix,
        ):
            raise InvalidInputError(
                f"The file's template differs from this service's {task.name!r} template, so its "
                "prompts would predict differently here: import only sets made with it."
            )
    if meta.get("source_format") == "peft" and (options.placement or meta.get("placement")) != (
        "template"
    ):
        raise InvalidInputError(
            "PEFT prompt tuning prepends its virtual tokens to the whole input, but this "
            f"service's {task.name!r} template places the prompt after the item text: these "
            "vectors would give different predictions here. Import adapters trained at the "
            "template's place (exported by this service, or trained with its template), and say "
            "so with placement=template."
        )


def _check_shape(prompts: np.ndarray, facts: CheckpointFacts, *, model: str) -> None:
    if prompts.ndim != 3 or prompts.shape[0] == 0 or prompts.shape[1] == 0:
        raise InvalidInputError(
            f"'prompts' has shape {list(prompts.shape)}; send [N, l, d] with N >= 1 users and "
            "l >= 1 prompt tokens."
        )
    if prompts.shape[2] != facts.hidden_size:
        raise InvalidInputError(
            f"'prompts' rows are {prompts.shape[2]} wide but {model}'s hidden size is "
            f"{facts.hidden_size}: import them under a model of that width, or migrate them."
        )


def _check_users(setfile: SetFile) -> int:
    """Every row's id is valid and no two rows share one; returns the count of present rows. The
    ids are checked a block at a time and compared as one array of bytes, never as one Python
    object per user."""
    if "user_ids" not in setfile.entries:
        raise InvalidInputError("The file has no 'user_ids' tensor [N, L] U8: add the users' ids.")
    rows, present = setfile.entries["user_ids"]["shape"][0], setfile.present()
    if rows != len(setfile.prompts) or len(present) != rows:
        raise InvalidInputError(
            f"'user_ids' lists {rows} users and 'present' {len(present)} for "
            f"{len(setfile.prompts)} prompt rows: give one per row."
        )
    for start in range(0, rows, 4096):
        for row, user in enumerate(setfile.user_ids(start, start + 4096), start):
            if not re.fullmatch(USER_ID_PATTERN, user):
                raise InvalidInputError(
                    f"Row {row}: user id {user[:40]!r} is invalid; use 1-128 characters from "
                    "A-Z a-z 0-9 _ . : -."
                )
    _refuse_duplicates(setfile)
    count = int(np.count_nonzero(present))
    if count == 0:
        raise InvalidInputError("No row of the file is present: there is nothing to import.")
    return count


def _refuse_duplicates(setfile: SetFile) -> None:
    """Refuse the first row (in file order) whose id an earlier row holds. The ids are sorted as
    fixed-width bytes (the file's own ``[N, L]`` block), so memory is the ids' bytes."""
    block = np.ascontiguousarray(setfile.rows("user_ids", 0, len(setfile.prompts)))
    keys = block.view(f"S{block.shape[1]}").ravel()  # trailing NULs (the padding) do not count
    order = np.argsort(keys, kind="stable")  # equal ids stay in file order
    repeats = np.flatnonzero(keys[order][1:] == keys[order][:-1])
    if len(repeats) == 0:
        return
    row = int(order[repeats + 1].min())
    first = int(np.flatnonzero(keys == keys[row])[0])
    user = keys[row].decode("ascii", "replace")
    raise InvalidInputError(
        f"Rows {first} and {row} both hold user {user!r}: keep one row per user."
    )


def _check_values(setfile: SetFile, *, scale: float, dtype: str) -> None:
    limit = float(np.finfo(codec.numpy_dtype(dtype)).max)
    for block in blocks(setfile, scale=scale):
        finite = np.isfinite(block.prompts).reshape(len(block.rows), -1).all(axis=1)
        if not finite.all():
            at = int(np.flatnonzero(~finite)[0])
            raise InvalidInputError(
                f"Row {int(block.rows[at])} (user {block.users[at]!r}) holds NaN or Inf: retrain "
                "or drop that user, then export again."
            )
        big = np.abs(block.prompts).reshape(len(block.rows), -1).max(axis=1) > limit
        if big.any():
            at = int(np.flatnonzero(big)[0])
            raise InvalidInputError(
                f"Row {int(block.rows[at])} (user {block.users[at]!r}) exceeds the {dtype} range "
                f"(|x| <= {limit:g}): store the set as float32."
            )


def _head(store: Store, model: str, task: Task, setfile: SetFile, options: ImportOptions) -> bytes:
    tensors = setfile.head()
    if not tensors:
        if options.head_from_version is None:
            raise InvalidInputError(
                "The file carries no task head (head.* tensors): export the set with its head, "
                f"or name a version of {model} whose {task.name!r} head to reuse "
                "(head_from_version)."
            )
        donor = store.require_version(model, options.head_from_version)
        if donor.task != task.name:
            raise InvalidInputError(
                f"{model} version {donor.version} has a {donor.task!r} head, not {task.name!r}: "
                "name a version of the same task."
            )
        return store.get_head(model, options.head_from_version)
    state = {k: torch.from_numpy(v).float() for k, v in tensors.items()}
    try:
        task.load_head(state)
    except RuntimeError as error:
        raise InvalidInputError(
            f"The file's head tensors {sorted(state)} are not a {task.name!r} head: {error}"
        ) from error
    if not all(torch.isfinite(t).all() for t in state.values()):
        raise InvalidInputError("The file's head holds NaN or Inf: export a trained head.")
    return save_tensors({k: v.contiguous() for k, v in state.items()})


def _source(bundle: dict[str, Any] | None, meta: dict[str, str]) -> dict[str, Any]:
    if bundle is None:
        return {k: v for k, v in meta.items() if k not in ("format", "format_version")}
    keys = ("model", "version", "checkpoint", "lineage", "metrics")
    return {key: bundle.get(key) for key in keys}


def write(store: Store, model: str, setfile: SetFile, checked: Checked) -> SetMeta:
    """Store a checked file as a new sealed version; a failure part way removes it again."""
    length, width = setfile.prompts.shape[1:]
    version = store.allocate_version(model)
    template = checked.task.template
    meta = SetMeta(
        model=model,
        version=version,
        task=checked.task.name,
        shape=[int(length), int(width)],
        dtype=checked.dtype,
        template=template.prefix + "<prompt>" + template.suffix,
        lineage=checked.lineage,
        created_at=time.time(),
    )

    def batches() -> Iterator[list[tuple[str, bytes]]]:
        for block in blocks(setfile, scale=checked.scale):
            values = block.prompts
            yield [(u, codec.encode(values[i], checked.dtype)) for i, u in enumerate(block.users)]

    try:
        return store.write_complete_set(meta, head=checked.head, batches=batches(), metrics={})
    except BaseException:
        store.delete_set(model, version)
        raise
