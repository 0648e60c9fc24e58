"""HTTP clients of the service for inference services: sync (``PromptClient``) and asyncio
(``AsyncPromptClient``), with the same reads.

Reads pin a version or follow the model's active one; a prompt or bundle read before is sent
back as ``If-None-Match`` and a 304 reuses it. Batch reads come from one version, atomically.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any, Literal, Protocol

import httpx

from prompt_migration_client.batch import Batch, parse_json, parse_safetensors
from prompt_migration_client.codec import decode
from prompt_migration_client.contract import Bundle, Prompt
from prompt_migration_client.errors import ClientError, ContractError, from_response

Encoding = Literal["json", "safetensors"]


class Response(Protocol):
    """What the client reads of an answer (httpx's, or a test client's of the same shape)."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def content(self) -> bytes: ...
    @property
    def text(self) -> str: ...
    def json(self, **kwargs: Any) -> Any: ...
    def iter_bytes(self, chunk_size: int | None = None) -> Iterator[bytes]: ...


def raise_for(response: Any) -> Response:
    """The response when it succeeded (or is a 304); else the typed error with its message."""
    if response.status_code < 400:
        return response
    try:
        body = response.json()
    except ValueError:
        body = None
    raise from_response(response.status_code, body, response.text)


class _Cache:
    """A small LRU of values by key, with the ETag each came with."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
        return self.items.get(key)

    def put(self, key: Any, value: Any) -> Any:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


def _conditional(cached: Any) -> dict[str, str]:
    etag = getattr(cached, "etag", "")
    return {"If-None-Match": etag} if etag else {}


def _prompt_params(model: str | None, version: str | None) -> dict[str, str]:
    params = {"model": model, "version": version}
    return {k: v for k, v in params.items() if v is not None}


def _prompt_from(user: str, response: Response) -> Prompt:
    headers = response.headers
    dtype = headers["X-Prompt-Dtype"]
    shape = tuple(int(n) for n in headers["X-Prompt-Shape"].split(","))
    return Prompt(
        user=user,
        model=headers["X-Prompt-Model"],
        version=headers["X-Prompt-Version"],
        values=decode(response.content, dtype=dtype, shape=shape),
        digest=headers.get("X-Prompt-Digest", ""),
        etag=headers.get("ETag", ""),
    )


def _batch_from(response: Response, encoding: Encoding) -> Batch:
    if encoding == "safetensors":
        return parse_safetensors(response.content)
    return parse_json(response.json())


def _format_params(encoding: Encoding) -> dict[str, str]:
    return {} if encoding == "json" else {"format": encoding}


def _batch_body(users: list[str], model: str | None, version: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"user_ids": list(users)}
    if model is not None:
        body["model"] = model
    if version is not None:
        if model is None:
            raise ContractError("A pinned version needs its model: pass model= as well.")
        body["version"] = version
    return body


def _bundle_path(model: str, version: str) -> str:
    return f"/models/{model}/versions/{version}"


class PromptClient:
    """Synchronous client. ``http`` may be any ``httpx.Client`` (tests pass the API's own)."""

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        *,
        token: str | None = None,
        timeout_s: float = 30.0,
        http: Any = None,
        cache_size: int = 10_000,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # ``http``: an httpx.Client, or one of its shape (a test client).
        self.http: Any = http or httpx.Client(base_url=base_url, timeout=timeout_s)
        self.headers = headers
        self._prompts = _Cache(cache_size)
        self._bundles = _Cache(64)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> PromptClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Response:
        headers = self.headers | kwargs.pop("headers", {})
        return raise_for(self.http.request(method, path, headers=headers, **kwargs))

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    # ---- reads ------------------------------------------------------------------------------

    def bundle(self, model: str, version: str) -> Bundle:
        """The set's contract and head weights (kept; a version's bundle never changes)."""
        key = (model, version)
        cached: Bundle | None = self._bundles.get(key)
        if cached is not None:
            return cached
        base = _bundle_path(model, version)
        doc = self.request("GET", f"{base}/bundle")
        head = self.request("GET", f"{base}/head")
        bundle = Bundle.parse(doc.json(), head.content, etag=doc.headers.get("ETag", ""))
        return self._bundles.put(key, bundle)

    def prompt(self, user: str, *, model: str | None = None, version: str | None = None) -> Prompt:
        """One user's prompt; the active version of ``model`` (or the default model) unless
        ``version`` pins one. A prompt read before is revalidated (304) rather than resent."""
        key = (user, model, version)
        cached = self._prompts.get(key)
        response = self.request(
            "GET",
            f"/users/{user}/prompt",
            params=_prompt_params(model, version),
            headers=_conditional(cached),
        )
        if response.status_code == 304 and cached is not None:
            return cached
        return self._prompts.put(key, _prompt_from(user, response))

    def prompts(
        self,
        users: list[str],
        *,
        model: str | None = None,
        version: str | None = None,
        encoding: Encoding = "json",
    ) -> Batch:
        """Many users' prompts from one version, in one atomic read (at most the service's
        ``PM_MAX_BATCH_USERS`` per call); ``encoding`` is the answer's, the same values."""
        body, params = _batch_body(users, model, version), _format_params(encoding)
        response = self.request("POST", "/prompts/batch", json=body, params=params)
        return _batch_from(response, encoding)


class AsyncPromptClient:
    """The same reads on asyncio; ``http`` may be any ``httpx.AsyncClient``."""

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        *,
        token: str | None = None,
        timeout_s: float = 30.0,
        http: httpx.AsyncClient | None = None,
        cache_size: int = 10_000,
    ) -> None:
        self.http = http or httpx.AsyncClient(base_url=base_url, timeout=timeout_s)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._prompts = _Cache(cache_size)
        self._bundles = _Cache(64)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncPromptClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> Response:
        headers = self.headers | kwargs.pop("headers", {})
        return raise_for(await self.http.request(method, path, headers=headers, **kwargs))

    async def bundle(self, model: str, version: str) -> Bundle:
        key = (model, version)
        cached: Bundle | None = self._bundles.get(key)
        if cached is not None:
            return cached
        base = _bundle_path(model, version)
        doc = await self.request("GET", f"{base}/bundle")
        head = await self.request("GET", f"{base}/head")
        bundle = Bundle.parse(doc.json(), head.content, etag=doc.headers.get("ETag", ""))
        return self._bundles.put(key, bundle)

    async def prompt(
        self, user: str, *, model: str | None = None, version: str | None = None
    ) -> Prompt:
        key = (user, model, version)
        cached = self._prompts.get(key)
        response = await self.request(
            "GET",
            f"/users/{user}/prompt",
            params=_prompt_params(model, version),
            headers=_conditional(cached),
        )
        if response.status_code == 304 and cached is not None:
            return cached
        return self._prompts.put(key, _prompt_from(user, response))

    async def prompts(
        self,
        users: list[str],
        *,
        model: str | None = None,
        version: str | None = None,
        encoding: Encoding = "json",
    ) -> Batch:
        body, params = _batch_body(users, model, version), _format_params(encoding)
        response = await self.request("POST", "/prompts/batch", json=body, params=params)
        return _batch_from(response, encoding)


__all__ = ["AsyncPromptClient", "Batch", "ClientError", "PromptClient", "raise_for"]
