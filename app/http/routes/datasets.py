"""Task data: the built-in MovieLens sets and operators' own JSONL files."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter, status

from app.errors import InvalidInputError
from app.http.deps import AdminDep, ReaderDep, StoreDep
from app.http.schemas import DatasetCreate, DatasetOut
from app.jobs.records import BUILTIN_DATASETS

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.get("", response_model=list[DatasetOut])
def list_datasets(store: StoreDep, _: ReaderDep) -> list[DatasetOut]:
    builtins = [DatasetOut(name=n, builtin=True) for n in BUILTIN_DATASETS]
    return builtins + [DatasetOut(builtin=False, **d) for d in store.list_datasets()]


@router.post("", response_model=DatasetOut, status_code=status.HTTP_201_CREATED)
def register_dataset(body: DatasetCreate, store: StoreDep, _: AdminDep) -> DatasetOut:
    if body.name in BUILTIN_DATASETS:
        raise InvalidInputError(f"{body.name!r} is a built-in dataset; choose another name.")
    path = Path(body.path)
    if not path.is_absolute():
        raise InvalidInputError(f"path {body.path!r} must be absolute (workers resolve it).")
    if not path.is_file():
        raise InvalidInputError(
            f"No file at {body.path!r}; give the path of an existing JSONL file that the API "
            "and workers can read."
        )
    if path.suffix != ".jsonl":
        raise InvalidInputError(f"{body.path!r} is not a .jsonl file; one JSON record per line.")
    out = DatasetOut(name=body.name, path=str(path), builtin=False, registered_at=time.time())
    store.put_dataset(body.name, out.model_dump(exclude={"builtin"}))
    return out
