"""The HTTP clients against a stand-in service (httpx.MockTransport): what they send, how they
parse each answer, and the typed errors. The real service's answers: tests/client in the repo."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import save as save_tensors

from prompt_migration_client import (
    AsyncPromptClient,
    Bundle,
    ContractError,
    NotFound,
    Unauthorized,
    Unavailable,
    codec,
)
from prompt_migration_client.batch import batch_json, batch_safetensors, found_values
from prompt_migration_client.operator import OperatorClient
from prompt_migration_client.setfile import write_setfile

PROMPTS = {
    u: np.random.default_rng(i).normal(size=(1, 4)).astype(np.float32)
    for i, u in enumerate(["u1", "u2"])
}
HEAD = save_tensors({"scale": np.array(1.5, np.float32), "bias": np.array(0.25, np.float32)})
DOC = {
    "model": "m",
    "version": "2",
    "prompt": {"shape": [1, 4], "dtype": "float32"},
    "head": {
        "sha256": hashlib.sha256(HEAD).hexdigest(),
        "steps": [
            {"op": "difference"},
            {"op": "affine", "scale": "scale", "bias": "bias"},
            {"op": "sigmoid"},
        ],
    },
}


class _Set:
    model, version, shape, dtype = "m", "2", [1, 4], "float32"


class Service:
    """Answers as the service does; records what it was sent."""

    def __init__(self) -> None:
        self.seen: list[httpx.Request] = []
        self.uploaded = b""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        if request.headers.get("Authorization") != "Bearer t":
            return httpx.Response(401, json={"error": "unauthorized", "detail": "Invalid token"})
        path = request.url.path
        if path.startswith("/users/"):
            return self._prompt(request, path.split("/")[2])
        if path == "/prompts/batch":
            users = json.loads(request.content)["user_ids"]
            found = found_values(
                users,
                [codec.encode(PROMPTS[u], "float32") if u in PROMPTS else None for u in users],
            )
            if request.url.params.get("format") == "safetensors":
                return httpx.Response(200, content=batch_safetensors(_Set(), users, found))
            return httpx.Response(200, content=batch_json(_Set(), users, found))
        if path == "/models/m/versions/2/bundle":
            return httpx.Response(200, json=DOC, headers={"ETag": '"b"'})
        if path == "/models/m/versions/2/head":
            return httpx.Response(200, content=HEAD)
        if path == "/models/m/versions/2/export":
            return httpx.Response(200, content=b"x" * 3000)
        if path == "/models/m/import":
            self.uploaded = request.read()
            return httpx.Response(201, json={"version": "3", "count": 2})
        if path == "/models/broken/versions/1/bundle":
            return httpx.Response(503, json={"error": "redis_unavailable", "detail": "retry"})
        return httpx.Response(404, json={"error": "not_found", "detail": f"No {path}"})

    def _prompt(self, request: httpx.Request, user: str) -> httpx.Response:
        if user not in PROMPTS:
            return httpx.Response(404, json={"error": "not_found", "detail": "has no prompt"})
        etag = f'"{user}-2"'
        if request.headers.get("If-None-Match") == etag:
            return httpx.Response(304, headers={"ETag": etag})
        headers = {
            "X-Prompt-Model": "m",
            "X-Prompt-Version": "2",
            "X-Prompt-Dtype": "float32",
            "X-Prompt-Shape": "1,4",
            "ETag": etag,
            "X-Prompt-Digest": "d",
        }
        return httpx.Response(200, content=codec.encode(PROMPTS[user], "float32"), headers=headers)


def client(service: Service, token: str = "t") -> OperatorClient:
    http = httpx.Client(transport=httpx.MockTransport(service), base_url="http://api")
    return OperatorClient(token=token, http=http)


def test_a_prompt_is_read_and_then_revalidated() -> None:
    service = Service()
    api = client(service)
    first = api.prompt("u1", model="m", version="2")
    assert (first.model, first.version, first.etag) == ("m", "2", '"u1-2"')
    assert np.array_equal(first.values, PROMPTS["u1"])
    assert api.prompt("u1", model="m", version="2") is first
    assert service.seen[-1].headers["If-None-Match"] == '"u1-2"'
    assert dict(service.seen[-1].url.params) == {"model": "m", "version": "2"}


@pytest.mark.parametrize("encoding", ["json", "safetensors"])
def test_a_batch_is_read_in_either_encoding(encoding: str) -> None:
    service = Service()
    batch = client(service).prompts(["u2", "ghost", "u1"], model="m", encoding=encoding)  # type: ignore[arg-type]
    assert (batch.model, batch.version, batch.missing) == ("m", "2", ["ghost"])
    assert all(np.array_equal(batch.prompts[u], PROMPTS[u]) for u in ("u1", "u2"))
    assert json.loads(service.seen[-1].content) == {"user_ids": ["u2", "ghost", "u1"], "model": "m"}
    with pytest.raises(ContractError, match="needs its model"):
        client(service).prompts(["u1"], version="2")


def test_a_bundle_applies_its_head_in_numpy() -> None:
    api = client(Service())
    bundle = api.bundle("m", "2")
    assert isinstance(bundle, Bundle) and bundle.shape == (1, 4) and bundle.etag == '"b"'
    got = bundle.apply_head(np.array([[0.0, 2.0]]))
    np.testing.assert_allclose(got, [1 / (1 + np.exp(-(1.5 * 2 + 0.25)))], rtol=1e-6)
    assert api.bundle("m", "2") is bundle
    with pytest.raises(ContractError, match="does not fit"):
        bundle.check_prompt(np.zeros((2, 4)))
    with pytest.raises(ContractError, match="does not match the bundle's sha256"):
        Bundle.parse(DOC, HEAD + b" ")


def test_errors_are_typed_with_the_service_message() -> None:
    service = Service()
    with pytest.raises(NotFound, match="has no prompt") as missing:
        client(service).prompt("ghost")
    assert (missing.value.status, missing.value.code) == (404, "not_found")
    with pytest.raises(Unauthorized, match="Invalid token"):
        client(service, token="wrong").prompt("u1")
    with pytest.raises(Unavailable, match="retry"):
        client(service).bundle("broken", "1")


def test_export_and_import_stream_with_progress(tmp_path: Path) -> None:
    service, seen = Service(), []
    api = client(service)
    dest = api.export(
        "m", "2", tmp_path / "set.safetensors", on_progress=lambda d, t: seen.append(d)
    )
    assert dest.read_bytes() == b"x" * 3000 and seen[-1] == 3000
    assert not (tmp_path / "set.safetensors.partial").exists()
    source = write_setfile(
        tmp_path / "up.safetensors",
        prompts=np.stack(list(PROMPTS.values())),
        users=list(PROMPTS),
        metadata={"task": "binary"},
    )
    done = api.import_file("m", source, activate=True, dtype="float16")
    assert done == {"version": "3", "count": 2} and service.uploaded == source.read_bytes()
    assert dict(service.seen[-1].url.params) == {"activate": "true", "dtype": "float16"}


def test_the_async_client_reads_the_same() -> None:
    async def read() -> None:
        transport = httpx.MockTransport(Service())
        http = httpx.AsyncClient(transport=transport, base_url="http://api")
        async with AsyncPromptClient(token="t", http=http) as api:
            one = await api.prompt("u2", model="m")
            assert await api.prompt("u2", model="m") is one
            batch = await api.prompts(["u1"], model="m", encoding="safetensors")
            bundle = await api.bundle("m", "2")
            with pytest.raises(NotFound):
                await api.prompt("ghost")
        assert np.array_equal(batch.prompts["u1"], PROMPTS["u1"]) and bundle.version == "2"

    asyncio.run(read())
