"""The registry: models, datasets, the active pointers readers follow, and activation."""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from app.errors import ConflictError, NotFoundError
from app.store import keys
from app.store.base import StoreBase, as_text
from app.store.meta import SEALED, SetMeta

# KEYS: the active pointers, the retired versions. ARGV: model, version, now, what happens to the
# default model ("keep": unchanged unless there is none; "set": this model; "follow": this model
# if the default is one of the sources in ARGV[6..]), then 1 when a newer active version wins.
# Versions are allocated in increasing numbers (SEQ), so "newer" compares them as numbers.
# Reply: {refused, previous version or "", default model after}.
_SWITCH_LUA = f"""
local model, version = ARGV[1], ARGV[2]
local previous = redis.call('HGET', KEYS[1], model) or ''
if ARGV[5] == '1' and tonumber(previous) and tonumber(version)
   and tonumber(previous) > tonumber(version) then
  return {{1, previous, redis.call('HGET', KEYS[1], '{keys.DEFAULT_MODEL}') or ''}}
end
local default = redis.call('HGET', KEYS[1], '{keys.DEFAULT_MODEL}')
local move = (not default) or ARGV[4] == 'set'
if ARGV[4] == 'follow' then
  for i = 6, #ARGV do
    if ARGV[i] == default then move = true end
  end
end
redis.call('HSET', KEYS[1], model, version)
if move then
  redis.call('HSET', KEYS[1], '{keys.DEFAULT_MODEL}', model)
  default = model
end
if previous ~= '' and previous ~= version then
  redis.call('ZADD', KEYS[2], ARGV[3], model .. '/' .. previous)
end
redis.call('ZREM', KEYS[2], model .. '/' .. version)
return {{0, previous, default}}
"""


@dataclass(frozen=True)
class Activation:
    """What an activation or promotion switched."""

    previous: str | None  # the version served before, if any
    default_model: str | None  # the model readers who name none get now


class RegistryMixin(StoreBase):
    if TYPE_CHECKING:  # from SetsMixin

        def get_meta(self, model: str, version: str) -> SetMeta: ...
        def delete_set(self, model: str, version: str) -> None: ...

    def ping(self) -> bool:
        return bool(self.redis.ping())

    # ---- models -------------------------------------------------------------------------------

    def put_model(self, name: str, spec: dict[str, Any]) -> None:
        self.redis.hset(keys.MODELS, name, json.dumps(spec))

    def get_model(self, name: str) -> dict[str, Any]:
        raw = self.redis.hget(keys.MODELS, name)
        if raw is None:
            raise NotFoundError(f"Unknown model {name!r}; register it first with POST /models.")
        return dict(json.loads(raw))

    def list_models(self) -> list[dict[str, Any]]:
        raw = self.redis.hgetall(keys.MODELS)
        return [json.loads(v) for _, v in sorted(raw.items())]

    def active_pointers(self) -> dict[str, str]:
        raw = self.redis.hgetall(keys.ACTIVE)
        return {str(as_text(k)): str(as_text(v)) for k, v in raw.items()}

    def resolve(self, model: str | None, version: str | None = None) -> tuple[str, str]:
        """(model, version) that readers get: the active version, the default model if none."""
        if model is not None and version is not None:
            return model, version
        pointers = self.active_pointers()  # one HGETALL: a consistent view during a switch
        model = model or pointers.get(keys.DEFAULT_MODEL)
        if model is None:
            raise NotFoundError("No model is active yet; promote a migration or activate a model.")
        if model not in pointers:
            self.get_model(model)  # unknown model -> 404 that says how to register it
            raise NotFoundError(
                f"Model {model!r} has no active prompt set; train one (POST /models/{model}/train)"
                " or run a migration to it."
            )
        return model, pointers[model]

    def activate(self, model: str, version: str, *, make_default: bool = False) -> Activation:
        """Serve ``version`` of ``model`` from now on (an operator's act, or a rollback), in one
        atomic write. Readers who name no model keep their model unless ``make_default`` (or no
        model is the default yet)."""
        self._require_sealed(model, version)
        return self._switch(model, version, default="set" if make_default else "keep")

    def promote(self, model: str, version: str, *, sources: Collection[str]) -> Activation:
        """Activate a migration's set unless a newer version of ``model`` is active already (a
        late or older job never rolls back a newer promotion), checked and switched atomically.
        Readers of the default model move with it when the default was one of its ``sources``:
        promoting a migration onto the serving model is what upgrades them."""
        self._require_sealed(model, version)
        return self._switch(model, version, default="follow", sources=sources, newest_wins=True)

    def _require_sealed(self, model: str, version: str) -> None:
        if self.get_meta(model, version).state != SEALED:
            raise ConflictError(
                f"{model} version {version} is still being written; only sealed sets can be "
                "activated. Wait for its job to finish."
            )

    def _switch(
        self,
        model: str,
        version: str,
        *,
        default: Literal["keep", "set", "follow"],
        sources: Collection[str] = (),
        newest_wins: bool = False,
    ) -> Activation:
        script = self.redis.register_script(_SWITCH_LUA)
        args: list[str | float] = [model, version, time.time(), default, int(newest_wins)]
        args += sources
        refused, previous, default_model = script(keys=[keys.ACTIVE, keys.RETIRED], args=args)
        previous_version = as_text(previous) or None
        if refused:
            raise ConflictError(
                f"{model} version {previous_version} is active and newer than version {version}; "
                f"promoting this job's set would roll it back. To serve version {version} anyway, "
                f"activate it explicitly: POST /models/{model}/activate."
            )
        return Activation(previous=previous_version, default_model=as_text(default_model) or None)

    def retire(self, model: str, version: str) -> None:
        """Have ``purge_retired`` delete the version (unless it is active by then)."""
        self.redis.zadd(keys.RETIRED, {keys.set_name(model, version): time.time()})

    def purge_retired(self, *, grace_s: float) -> list[str]:
        """Delete versions retired more than ``grace_s`` ago and not active again since."""
        cutoff = time.time() - grace_s
        due = [str(as_text(m)) for m in self.redis.zrangebyscore(keys.RETIRED, 0, cutoff)]
        active = self.active_pointers()
        purged = []
        for item in due:
            model, version = item.split("/", 1)
            if active.get(model) != version:
                self.delete_set(model, version)
                purged.append(item)
            self.redis.zrem(keys.RETIRED, item)
        return purged

    # ---- datasets -----------------------------------------------------------------------------

    def put_dataset(self, name: str, spec: dict[str, Any]) -> None:
        self.redis.hset(keys.DATASETS, name, json.dumps(spec))

    def get_dataset(self, name: str) -> dict[str, Any] | None:
        raw = self.redis.hget(keys.DATASETS, name)
        return None if raw is None else dict(json.loads(raw))

    def list_datasets(self) -> list[dict[str, Any]]:
        return [json.loads(v) for _, v in sorted(self.redis.hgetall(keys.DATASETS).items())]
