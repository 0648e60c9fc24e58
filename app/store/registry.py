"""The registry: models, datasets, the active pointers readers follow, and activation."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from app.errors import ConflictError, NotFoundError
from app.store import keys
from app.store.base import StoreBase, as_text
from app.store.meta import SEALED, SetMeta


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

    def activate(self, model: str, version: str, *, make_default: bool = True) -> str | None:
        """Switch the model's active set in one atomic write; returns the previous version."""
        meta = self.get_meta(model, version)
        if meta.state != SEALED:
            raise ConflictError(
                f"{model} version {version} is still being written; only sealed sets can be "
                "activated. Wait for its job to finish."
            )
        previous = self.active_pointers().get(model)
        mapping: dict[Any, Any] = {model: version}
        if make_default:
            mapping[keys.DEFAULT_MODEL] = model
        self.redis.hset(keys.ACTIVE, mapping=mapping)
        if previous and previous != version:
            self.redis.zadd(keys.RETIRED, {f"{model}/{previous}": time.time()})
        self.redis.zrem(keys.RETIRED, f"{model}/{version}")
        return previous

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
