"""Foundation models: register, list, activate a prompt-set version (rollback), train prompts."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Response, status

from app.errors import ConflictError
from app.http.deps import AdminDep, CeleryDep, ReaderDep, StoreDep
from app.http.schemas import Activate, ActivateOut, Job, ModelCreate, ModelOut
from app.jobs import records as jobs
from app.jobs.spec import TrainRequest
from app.store import Store

router = APIRouter(prefix="/models", tags=["models"])


def _hidden_size(checkpoint: Path) -> int | None:
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError):
        return None
    size = config.get("hidden_size") or config.get("text_config", {}).get("hidden_size")
    return int(size) if size else None


def _view(store: Store, spec: dict[str, Any], pointers: dict[str, str]) -> ModelOut:
    versions = [m.public() for m in store.list_versions(spec["name"])]
    return ModelOut(
        active_version=pointers.get(spec["name"]),
        default=pointers.get("__default__") == spec["name"],
        versions=versions,
        **spec,
    )


@router.post("", response_model=ModelOut, status_code=status.HTTP_201_CREATED)
def register_model(body: ModelCreate, store: StoreDep, _: AdminDep, response: Response) -> ModelOut:
    from models.checkpoints import resolve_checkpoint

    checkpoint = body.checkpoint or body.name
    path = resolve_checkpoint(checkpoint)  # UnknownModelError / CheckpointError -> 4xx
    existing = {m["name"]: m for m in store.list_models()}.get(body.name)
    if existing is not None:
        if existing["checkpoint"] != checkpoint:
            raise ConflictError(
                f"Model {body.name!r} is registered with checkpoint {existing['checkpoint']!r}; "
                "register the new checkpoint under a new name."
            )
        response.status_code = status.HTTP_200_OK
        return _view(store, existing, store.active_pointers())
    spec = {
        "name": body.name,
        "checkpoint": checkpoint,
        "hidden_size": _hidden_size(Path(path)),
        "registered_at": time.time(),
    }
    store.put_model(body.name, spec)
    return _view(store, spec, store.active_pointers())


@router.get("", response_model=list[ModelOut])
def list_models(store: StoreDep, _: ReaderDep) -> list[ModelOut]:
    pointers = store.active_pointers()
    return [_view(store, spec, pointers) for spec in store.list_models()]


@router.post("/{name}/activate", response_model=ActivateOut)
def activate_version(name: str, body: Activate, store: StoreDep, _: AdminDep) -> ActivateOut:
    store.get_model(name)
    activation = store.activate(name, body.version, make_default=body.default)
    return ActivateOut(
        model=name,
        version=body.version,
        previous_version=activation.previous,
        default_model=activation.default_model,
    )


@router.post("/{name}/train", response_model=Job, status_code=status.HTTP_201_CREATED)
def train_prompt_set(
    name: str, body: TrainRequest, store: StoreDep, celery: CeleryDep, _: AdminDep
) -> Job:
    return jobs.view(jobs.create_training(store, celery, name, body))
