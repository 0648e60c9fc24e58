"""Per-user prompts: the inference hot path (GET, batch) and onboarding/erasure (admin)."""

from __future__ import annotations

import json
from functools import partial
from typing import Annotated, Literal

import numpy as np
from anyio import to_thread
from celery import Celery
from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from prompt_migration_client import codec
from prompt_migration_client.batch import batch_json, batch_safetensors, found_values
from safetensors.numpy import save as save_safetensors

from app.config import Settings
from app.errors import InvalidInputError, NotFoundError
from app.http.deps import AdminDep, CeleryDep, ReaderDep, SettingsDep, StoreDep
from app.http.fastpath import etag_matches, prompt_headers
from app.http.metrics import PROMPTS_SERVED
from app.http.schemas import BatchOut, BatchRequest, Erased, PromptJSON, PromptUpload, PromptWritten
from app.jobs import records as jobs
from app.store import MODEL_NAME_PATTERN, USER_ID_PATTERN, Follower, SetFormat, Store

router = APIRouter(tags=["prompts"])

UserId = Annotated[
    str, Path(pattern=USER_ID_PATTERN, description="1-128 chars of A-Z a-z 0-9 _ . : -")
]
ModelQuery = Annotated[
    str | None, Query(pattern=MODEL_NAME_PATTERN, description="Default: the active model.")
]
VersionQuery = Annotated[
    str | None, Query(max_length=32, description="Default: the model's active version.")
]


def _readable(store: Store, model: str | None, version: str | None) -> SetFormat:
    model, version = store.resolve(model, version)
    meta = store.sealed_format(model, version)
    if meta is None:
        raise NotFoundError(f"{model} version {version} is not sealed yet; it cannot be read.")
    return meta


@router.get(
    "/users/{user_id}/prompt",
    responses={200: {"content": {"application/octet-stream": {}}}, 304: {}},
)
async def get_prompt(
    user_id: UserId,
    store: StoreDep,
    _: ReaderDep,
    model: ModelQuery = None,
    version: VersionQuery = None,
    format: Literal["raw", "json", "safetensors"] = "raw",
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    # Served by app.http.fastpath.PromptFastPath for format=raw; this route documents the contract and
    # answers the other formats. One round trip: pointer, seal check and value, atomically.
    meta, (value,) = await store.read_prompts(model, version, [user_id])
    if value is None:
        raise NotFoundError(
            f"User {user_id!r} has no prompt for {meta.model} version {meta.version}; onboard "
            "one with PUT /users/{id}/prompt or migrate the model's users."
        )
    digest = codec.digest(value)
    headers = prompt_headers(meta, user_id, digest)
    if if_none_match and etag_matches(if_none_match, headers["ETag"]):
        return Response(status_code=304, headers=headers)
    PROMPTS_SERVED.labels(format).inc()
    if format == "raw":
        return Response(value, media_type="application/octet-stream", headers=headers)
    array = codec.decode(value, dtype=meta.dtype, shape=tuple(meta.shape))
    if format == "json":
        body = PromptJSON(
            user_id=user_id,
            model=meta.model,
            version=meta.version,
            shape=meta.shape,
            dtype=meta.dtype,
            digest=digest,
            values=array.tolist(),
        )
        return JSONResponse(body.model_dump(), headers=headers)
    data = save_safetensors(
        {"prompt": array}, metadata={"model": meta.model, "version": meta.version, "user": user_id}
    )
    return Response(data, media_type="application/octet-stream", headers=headers)


def _parse_upload(body: bytes, *, is_json: bool, dtype: str) -> np.ndarray:
    if is_json:
        try:
            upload = PromptUpload.model_validate(json.loads(body))
            return np.asarray(upload.values, dtype=np.float64)
        except (ValueError, RecursionError) as exc:  # bad JSON, fields, nesting or ragged rows
            raise InvalidInputError(
                f'Body must be JSON {{"values": [[...], ...]}} (prompt_length x hidden_size, '
                f"every row as long): {str(exc)[:300]}"
            ) from exc
    width = codec.numpy_dtype(dtype).itemsize
    if len(body) % width:
        raise InvalidInputError(f"Raw body length {len(body)} is not a multiple of {width}.")
    return np.frombuffer(body, dtype=codec.numpy_dtype(dtype)).astype(np.float64)


def _prompt_value(body: bytes, meta: SetFormat, *, is_json: bool, dtype: str) -> bytes:
    """The uploaded prompt as the set stores it, checked against the set's shape and dtype."""
    array = _parse_upload(body, is_json=is_json, dtype=dtype)
    if array.ndim == 1 and array.size == int(np.prod(meta.shape)):
        array = array.reshape(meta.shape)
    elif array.ndim == 1:
        raise InvalidInputError(
            f"Raw body holds {array.size} values; {meta.model} prompts have shape "
            f"{meta.shape} = {int(np.prod(meta.shape))} values."
        )
    return codec.encode(
        codec.check_prompt(array, shape=tuple(meta.shape), dtype=meta.dtype), meta.dtype
    )


@router.put("/users/{user_id}/prompt", response_model=PromptWritten)
async def put_prompt(
    user_id: UserId,
    request: Request,
    store: StoreDep,
    celery: CeleryDep,
    settings: SettingsDep,
    _: AdminDep,
    model: ModelQuery = None,
    x_prompt_dtype: Annotated[
        Literal["float32", "float16"], Header(description="dtype of a raw body")
    ] = "float32",
) -> PromptWritten:
    # Async only to read the body; the store's calls (sync client) and the decoding run in one
    # worker thread, so a slow Redis or a large body never holds up the reads on the loop.
    body = await request.body()  # the body gate (app.http.handlers) holds it to PM_MAX_BODY_BYTES
    is_json = request.headers.get("content-type", "").startswith("application/json")
    write = partial(
        _write_prompt,
        store,
        celery,
        settings,
        model=model,
        user=user_id,
        body=body,
        is_json=is_json,
        dtype=x_prompt_dtype,
    )
    return await to_thread.run_sync(write)


def _write_prompt(
    store: Store,
    celery: Celery,
    settings: Settings,
    *,
    model: str | None,
    user: str,
    body: bytes,
    is_json: bool,
    dtype: str,
) -> PromptWritten:
    """PUT's work, in one thread: the set it writes, the value checked against it, the write,
    and the wake of the migrations following the set."""
    meta = _readable(store, model, None)
    value = _prompt_value(body, meta, is_json=is_json, dtype=dtype)
    created, followers = store.onboard_followed(meta.model, meta.version, user, value)
    if followers:  # migrations made from this set apply the write too (workers/follow.py)
        _wake(store, celery, settings, followers)
    return PromptWritten(
        user_id=user,
        model=meta.model,
        version=meta.version,
        created=created,
        digest=codec.digest(value),
    )


def _wake(store: Store, celery: Celery, settings: Settings, followers: list[Follower]) -> None:
    jobs.wake_followers(
        store, celery, followers, delay_s=settings.follow_delay_s, ttl_s=settings.follow_wake_ttl_s
    )


@router.delete("/users/{user_id}", response_model=Erased)
def erase_user(
    user_id: UserId, store: StoreDep, celery: CeleryDep, settings: SettingsDep, _: AdminDep
) -> Erased:
    removed, followers = store.erase_user_followed(user_id)
    _wake(store, celery, settings, followers)
    if removed == 0:
        raise NotFoundError(f"User {user_id!r} has no prompt in any model; nothing to erase.")
    return Erased(user_id=user_id, keys_removed=removed)


# Above this many value bytes, encoding the batch answer moves off the event loop.
_INLINE_ENCODE_BYTES = 1 << 20
_BATCH_ENCODERS = {"json": batch_json, "safetensors": batch_safetensors}


def _encoded_bytes(value_bytes: int, format: str) -> int:
    return 4 * -(-value_bytes // 3) if format == "json" else value_bytes  # base64 in JSON


def _check_reply_size(
    meta: SetFormat, users: list[str], *, value_bytes: int, format: str, limit: int
) -> None:
    """Refuse a reply over ``limit`` bytes before it is built, saying how many users fit."""
    reply = _encoded_bytes(value_bytes, format) + sum(len(u) + 6 for u in users)
    if reply <= limit:
        return
    prompt = codec.numpy_dtype(meta.dtype).itemsize * int(np.prod(meta.shape))
    fit = limit // (_encoded_bytes(prompt, format) + 6 + max(len(u) for u in users))
    advice = f"send at most {fit} users per request" if fit else "raise the limit"
    raise InvalidInputError(
        f"The reply would hold about {reply} bytes, over PM_MAX_BATCH_REPLY_BYTES ({limit}): "
        f"{meta.model} version {meta.version} prompts are {prompt} bytes each, so {advice} "
        f"({format})."
    )


@router.post(
    "/prompts/batch",
    response_model=BatchOut,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def batch(
    body: BatchRequest,
    store: StoreDep,
    settings: SettingsDep,
    _: ReaderDep,
    format: Annotated[
        Literal["json", "safetensors"],
        Query(description="json: BatchOut, base64 values; safetensors: one [n, l, d] tensor."),
    ] = "json",
) -> Response:
    """The users' prompts in the active set of ``model`` (default: the default model).

    All values come from one version, read in one atomic round trip. JSON answers have the
    documented ``BatchOut`` shape (returned as built, not validated again); safetensors answers
    hold ``prompts`` ``[n_found, l, d]`` with ``users``, ``missing``, ``model`` and ``version``
    in the file's metadata.
    """
    users = body.checked_ids(max_users=settings.max_batch_users)
    meta, values = await store.read_prompts(body.model, body.version, users)
    found = found_values(users, values)
    value_bytes = sum(len(v) for v in found.values())
    _check_reply_size(
        meta, users, value_bytes=value_bytes, format=format, limit=settings.max_batch_reply_bytes
    )
    encode = _BATCH_ENCODERS[format]
    if value_bytes > _INLINE_ENCODE_BYTES:
        content = await to_thread.run_sync(encode, meta, users, found)
    else:
        content = encode(meta, users, found)
    PROMPTS_SERVED.labels("batch").inc(len(found))
    media_type = "application/json" if format == "json" else "application/octet-stream"
    return Response(content, media_type=media_type)
