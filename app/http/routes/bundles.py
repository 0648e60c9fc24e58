"""A sealed set's inference contract: the bundle (JSON) and its head weights (safetensors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Header, Path, Response
from fastapi.responses import JSONResponse

from app.http.deps import ReaderDep, StoreDep
from app.sets.bundle import published
from app.store import MODEL_NAME_PATTERN

router = APIRouter(prefix="/models", tags=["bundles"])

ModelName = Annotated[str, Path(pattern=MODEL_NAME_PATTERN, description="A registered model.")]
Version = Annotated[
    str, Path(pattern=r"^[A-Za-z0-9._-]{1,32}$", description="A prompt set version.")
]
IfNoneMatch = Annotated[str | None, Header()]
# A version's bundle and head never change once sealed: caches may keep them for good.
IMMUTABLE = "public, max-age=31536000, immutable"


def matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = {t.strip() for t in if_none_match.split(",")}
    return etag in tags or "*" in tags


def immutable(
    if_none_match: str | None, etag: str, respond: Callable[[dict[str, str]], Response]
) -> Response:
    """A 304 when the client holds ``etag``, else ``respond(headers)``; cacheable for good."""
    headers = {"ETag": etag, "Cache-Control": IMMUTABLE}
    if matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return respond(headers)


@router.get(
    "/{name}/versions/{version}/bundle",
    responses={200: {"description": "The contract; see the README"}, 304: {}, 404: {}, 409: {}},
)
def get_bundle(
    name: ModelName,
    version: Version,
    store: StoreDep,
    _: ReaderDep,
    if_none_match: IfNoneMatch = None,
) -> Response:
    """How to turn this set's prompts into the service's predictions: checkpoint, template,
    label tokens, the prompt's space and scale, the head and how to apply it, lineage, metrics."""
    bundle = published(store, name, version)
    return immutable(if_none_match, bundle.etag, lambda h: JSONResponse(bundle.doc, headers=h))


@router.get(
    "/{name}/versions/{version}/head",
    responses={200: {"content": {"application/octet-stream": {}}}, 304: {}, 404: {}, 409: {}},
)
def get_head(
    name: ModelName,
    version: Version,
    store: StoreDep,
    _: ReaderDep,
    if_none_match: IfNoneMatch = None,
) -> Response:
    """The task head's weights as safetensors (the bundle's ``head.steps`` say how to apply
    them)."""
    bundle = published(store, name, version)
    return immutable(
        if_none_match,
        bundle.head_etag,
        lambda h: Response(bundle.head, media_type="application/octet-stream", headers=h),
    )
