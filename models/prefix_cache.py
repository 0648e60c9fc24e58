"""A frozen model's keys and values over each item text, computed once and reused.

``FoundationModel.warm_prefixes`` fills it. In memory it lives as long as the model. Given a
directory, it is also kept on disk: a restarted worker, or the next job on the same model, reads
the states back instead of running the model over every item again. On a 2-core CPU that run is
most of a job's fixed cost (bench/README.md, "The whole upgrade job").

The directory belongs to one model on one kind of machine (``state_fingerprint``): a state is only
reused where recomputing it would give the same bits. Its parent holds every model's directories,
and ``max_bytes`` bounds them all: past it, the shards read or written longest ago are deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

SHARD_SUFFIX = ".safetensors"
# A state's computation: batch rows and width multiple of the fill (FoundationModel.warm_prefixes).
Fill = tuple[int, int]
# A shard's path under the kept states' root: a fingerprint directory and a random name.
_OURS = re.compile(r"[0-9a-f]{24}/[0-9a-f]{32}" + re.escape(SHARD_SUFFIX))


def state_fingerprint(checkpoint: Path, *, dtype: torch.dtype, device: torch.device) -> str:
    """What the states depend on besides the text: the checkpoint's files as installed, the
    dtype, the kernels (torch, transformers and the CPU's vector unit or the GPU)."""
    stats = sorted((p.name, p.stat()) for p in checkpoint.iterdir() if p.is_file())
    parts = [f"{name}:{stat.st_size}:{stat.st_mtime_ns}" for name, stat in stats]
    if device.type == "cuda":
        kernels = torch.cuda.get_device_name(device)
    else:
        kernels = torch.backends.cpu.get_cpu_capability()
    parts += [str(dtype), device.type, kernels, torch.__version__, transformers.__version__]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _key(text: str, fill: Fill) -> str:
    return hashlib.sha256(f"{fill[0]}/{fill[1]}/{text}".encode()).hexdigest()[:32]


@dataclass
class PrefixCache:
    """Per-text keys/values of the frozen model: text -> ``[layers, 2, kv_heads, P, head_dim]``.

    With a ``directory``, each batch of new states is one safetensors shard there, written to a
    temporary name and renamed, so that workers sharing the directory never read half a file. A
    shard deleted meanwhile (by a bound, or by hand) only makes its states missing again."""

    states: dict[str, torch.Tensor] = field(default_factory=dict)
    directory: Path | None = None
    max_bytes: int | None = None  # for the directory's parent, every model's shards together
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    compute_seconds: float = 0.0  # spent by the model computing the states added so far
    _shard_of: dict[str, Path] = field(default_factory=dict, repr=False)
    _shards_read: set[Path] = field(default_factory=set, repr=False)

    def missing(self, texts: list[str], *, fill: Fill) -> list[str]:
        """The distinct ``texts`` with no state, in memory or on disk (those on disk are loaded)."""
        todo = [t for t in dict.fromkeys(texts) if t not in self.states]
        if todo and self.directory is not None:
            self._load(todo, fill=fill)
            todo = [t for t in todo if t not in self.states]
        return todo

    def add(self, computed: dict[str, torch.Tensor], *, fill: Fill, seconds: float) -> None:
        """Keep states the model computed in ``seconds``."""
        self.states.update(computed)
        self.compute_seconds += seconds
        if computed and self.directory is not None:
            self._save(computed, fill=fill)

    def _load(self, texts: list[str], *, fill: Fill) -> None:
        self._index_new_shards()
        by_shard: dict[Path, list[tuple[str, str]]] = {}
        for text in texts:
            key = _key(text, fill)
            if key in self._shard_of:
                by_shard.setdefault(self._shard_of[key], []).append((text, key))
        for shard, wanted in by_shard.items():
            try:
                with safe_open(shard, framework="pt", device=str(self.device)) as stored:
                    for text, key in wanted:
                        self.states[text] = stored.get_tensor(key)
            except (OSError, SafetensorError) as error:
                log.warning("item states %s gone or unreadable, recomputed: %s", shard, error)
                self._shard_of = {k: s for k, s in self._shard_of.items() if s != shard}
                continue
            with contextlib.suppress(OSError):  # a read-only directory keeps its order
                os.utime(shard)  # read now: the bound deletes it last

    def _index_new_shards(self) -> None:
        assert self.directory is not None
        if not self.directory.is_dir():
            return
        for shard in sorted(self.directory.glob(f"*{SHARD_SUFFIX}")):
            if shard in self._shards_read:
                continue
            try:
                with safe_open(shard, framework="pt") as stored:
                    self._shard_of.update(dict.fromkeys(stored.keys(), shard))
            except (OSError, SafetensorError) as error:
                log.warning("item states %s unreadable, recomputed instead: %s", shard, error)
            self._shards_read.add(shard)

    def _save(self, computed: dict[str, torch.Tensor], *, fill: Fill) -> None:
        assert self.directory is not None
        tensors = {_key(text, fill): state.contiguous().cpu() for text, state in computed.items()}
        shard = self.directory / f"{uuid.uuid4().hex}{SHARD_SUFFIX}"
        partial = shard.with_suffix(".partial")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            save_file(tensors, partial)
            os.replace(partial, shard)
        except OSError as error:  # a full or read-only disk costs the reuse, not the job
            log.warning("item states not kept in %s: %s", self.directory, error)
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            return
        self._shard_of.update(dict.fromkeys(tensors, shard))
        self._shards_read.add(shard)
        if self.max_bytes is not None:
            trim(self.directory.parent, max_bytes=self.max_bytes, keep=shard)


def trim(root: Path, *, max_bytes: int, keep: Path) -> None:
    """Delete the shards under ``root`` read or written longest ago until they hold at most
    ``max_bytes`` (``keep``, the one just written, stays)."""
    shards = []
    for shard in root.glob(f"*/*{SHARD_SUFFIX}"):
        if not _OURS.fullmatch(f"{shard.parent.name}/{shard.name}"):
            continue  # a file of something else in a directory set by hand
        with contextlib.suppress(OSError):  # another worker may delete it meanwhile
            stat = shard.stat()
            shards.append((stat.st_mtime_ns, stat.st_size, shard))
    total = sum(size for _, size, _ in shards)
    for _, size, shard in sorted(shards):
        if total <= max_bytes:
            return
        if shard != keep:
            with contextlib.suppress(OSError):
                shard.unlink()
            total -= size
