"""Bulk export of a sealed prompt set and import of a set file as a new version (admin)."""

from __future__ import annotations

import os
import re
import tempfile
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

from anyio import to_thread
from fastapi import APIRouter, Query, Request, status
from fastapi.responses import StreamingResponse
from prompt_migration_client.errors import FormatError
from prompt_migration_client.setfile import SetFile, open_setfile

from app.errors import InvalidInputError, ServiceError
from app.http.deps import AdminDep, StoreDep
from app.http.routes.bundles import ModelName, Version
from app.http.schemas import Imported
from app.sets import transfer
from app.sets.bundle import published
from app.store import Store
from models.errors import MigrationError

router = APIRouter(prefix="/models", tags=["transfer"])
# Imports stream their body to disk: the body gate (app.http.handlers) holds them to
# PM_MAX_IMPORT_BYTES instead of PM_MAX_BODY_BYTES, counting as they stream.
STREAMED_BODIES = re.compile(r"/models/[^/]+/import")


@router.get(
    "/{name}/versions/{version}/export",
    responses={200: {"content": {"application/octet-stream": {}}}, 404: {}, 409: {}},
)
def export_set(
    name: ModelName, version: Version, store: StoreDep, _: AdminDep
) -> StreamingResponse:
    """Every user's prompt of a sealed set as one safetensors file, streamed: ``prompts``
    ``[N, l, d]``, ``present`` ``[N]``, ``user_ids`` ``[N, L]``, the head, and the set's bundle
    in the metadata (format: README, "Bulk export and import")."""
    bundle = published(store, name, version)
    out = transfer.export(store, bundle)
    headers = {
        "Content-Length": str(out.length),
        "Content-Disposition": f'attachment; filename="{name}-v{version}.safetensors"',
        "ETag": bundle.etag,
    }
    return StreamingResponse(out.chunks, media_type="application/octet-stream", headers=headers)


_WRITE_BYTES = 1 << 20  # the body goes to disk in blocks of this size, each in a worker thread


async def _receive(request: Request) -> Path:
    """The body, streamed into a temporary file (never whole in memory); the body gate holds it
    to PM_MAX_IMPORT_BYTES. The disk's writes run in worker threads, off the event loop."""
    descriptor, name = await to_thread.run_sync(
        partial(tempfile.mkstemp, prefix="pm-import-", suffix=".safetensors")
    )
    path = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            block = bytearray()
            async for chunk in request.stream():
                block += chunk
                if len(block) >= _WRITE_BYTES:
                    await to_thread.run_sync(handle.write, bytes(block))
                    block.clear()
            await to_thread.run_sync(handle.write, bytes(block))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _checked(
    store: Store, model: str, path: Path, options: transfer.ImportOptions
) -> tuple[SetFile, transfer.Checked]:
    """The file, checked whole. Its header and metadata are the sender's: whatever in them the
    checks did not foresee is still the sender's mistake (422), never the service's (500)."""
    try:
        setfile = open_setfile(path)
        return setfile, transfer.check(store, model, setfile, options)
    except (ServiceError, FormatError, MigrationError):
        raise
    except (TypeError, KeyError, AttributeError, IndexError, ValueError) as error:
        raise InvalidInputError(
            f"The set file is malformed ({type(error).__name__}: {str(error)[:200]}): export "
            "sets with GET /models/{name}/versions/{version}/export and send them unchanged."
        ) from error


def _import(store: Store, model: str, path: Path, options: transfer.ImportOptions) -> Imported:
    setfile, checked = _checked(store, model, path, options)
    meta = transfer.write(store, model, setfile, checked)
    if options.activate:
        store.activate(model, meta.version)
    return Imported(
        model=model,
        version=meta.version,
        count=meta.count,
        digest=meta.digest,
        shape=meta.shape,
        dtype=meta.dtype,
        lineage=meta.lineage,
        active=options.activate,
    )


@router.post(
    "/{name}/import",
    response_model=Imported,
    status_code=status.HTTP_201_CREATED,
    openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}}},
)
async def import_set(
    name: ModelName,
    request: Request,
    store: StoreDep,
    _: AdminDep,
    activate: bool = False,
    dtype: Annotated[
        Literal["float32", "float16"] | None, Query(description="Stored dtype; default the file's.")
    ] = None,
    head_from_version: Annotated[
        str | None,
        Query(max_length=32, description="Reuse this version's head if the file has none."),
    ] = None,
    placement: Annotated[
        Literal["template"] | None,
        Query(
            description="For PEFT adapters: `template` states they were trained at the "
            "template's place, not prepended."
        ),
    ] = None,
) -> Any:
    """A set file (see export) as a new sealed version of ``name``; checked whole before
    anything is stored, written and verified as the workers write sets."""
    await to_thread.run_sync(store.get_model, name)  # 404 before the body is read
    path = await _receive(request)
    options = transfer.ImportOptions(activate, dtype, head_from_version, placement)
    try:
        return await to_thread.run_sync(_import, store, name, path, options)
    finally:
        await to_thread.run_sync(partial(path.unlink, missing_ok=True))
