"""Bulk export and import of a prompt set: round trip, erasure during export, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prompt_migration_client import BadRequest, NotFound
from prompt_migration_client.contract import RAW
from prompt_migration_client.operator import OperatorClient
from prompt_migration_client.setfile import write_setfile
from redis import Redis
from safetensors.numpy import load_file

from app.sets import transfer
from app.sets.bundle import published
from app.store import Store
from tests.app.sets import model_set
from tests.conftest import ADMIN, reader

USERS = ["u1", "u2", "u3", "u4", "u5"]


def operator(client: TestClient) -> OperatorClient:
    return OperatorClient(token=ADMIN, http=client)


def stored(store_redis: Redis) -> dict[object, object]:
    """Every key's type and a dump of its value: what a refused import must leave alone."""
    return {key: store_redis.dump(key) for key in sorted(store_redis.keys("*"))}


def test_export_then_import_gives_the_same_set(
    client: TestClient, store: Store, tmp_path: Path
) -> None:
    version, prompts = model_set(store, users=USERS, length=2)
    api = operator(client)
    seen: list[tuple[int, int]] = []
    path = api.export(
        "tiny-gemma",
        version,
        tmp_path / "set.safetensors",
        on_progress=lambda done, total: seen.append((done, total)),
    )
    assert seen[-1][0] == seen[-1][1] == path.stat().st_size
    tensors = load_file(path)  # the safetensors library reads it as it is
    assert tensors["prompts"].shape == (5, 2, 48) and tensors["present"].tolist() == [1] * 5
    ids = [bytes(row).rstrip(b"\0").decode() for row in tensors["user_ids"]]
    for row, user in enumerate(ids):
        np.testing.assert_array_equal(tensors["prompts"][row], prompts[user])
    bundle = published(store, "tiny-gemma", version)
    with path.open("rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    assert json.loads(header["__metadata__"]["bundle"]) == bundle.doc
    assert header["__metadata__"]["space"] == RAW
    done = api.import_file("tiny-gemma", path, activate=True)
    assert done["version"] != version and done["count"] == 5 and done["active"]
    assert done["lineage"]["source"]["version"] == version
    assert done["digest"] == store.get_meta("tiny-gemma", version).digest
    new = published(store, "tiny-gemma", done["version"])
    assert new.head == bundle.head
    again = client.get("/users/u3/prompt?model=tiny-gemma", headers=reader())
    assert again.headers["X-Prompt-Version"] == done["version"]
    assert again.content == prompts["u3"].astype("<f4").tobytes()


def test_a_user_erased_during_export_is_flagged_absent(store: Store, tmp_path: Path) -> None:
    version, _ = model_set(store, users=USERS)
    out = transfer.export(store, published(store, "tiny-gemma", version), batch=2)
    parts = [next(out.chunks)]  # the header: the users are listed
    store.erase_user("u4")
    path = tmp_path / "set.safetensors"
    path.write_bytes(b"".join([*parts, *out.chunks]))
    assert path.stat().st_size == out.length
    tensors = load_file(path)
    assert tensors["present"].tolist() == [1, 1, 1, 0, 1]
    assert not tensors["prompts"][3].any()


def bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Files an import must refuse, each with a phrase its 422 must hold."""
    rng = np.random.default_rng(0)
    good = rng.normal(size=(4, 1, 48)).astype(np.float32)
    meta = {"task": "rating", "space": RAW}
    nan = good.copy()
    nan[2, 0, 5] = np.nan
    cases = {
        "width": (
            rng.normal(size=(4, 1, 32)).astype(np.float32),
            ["a", "b", "c", "d"],
            "hidden size is 48",
        ),
        "nan": (nan, ["a", "b", "c", "d"], "Row 2 (user 'c') holds NaN"),
        "duplicate": (good, ["a", "b", "a", "d"], "Rows 0 and 2 both hold user 'a'"),
        # The first row (in file order) that repeats an id is named, whatever the ids sort as.
        "later duplicate": (good, ["b", "ab", "ab", "b"], "Rows 1 and 2 both hold user 'ab'"),
        "invalid id": (good, ["a", "b c", "c", "d"], "Row 1: user id 'b c' is invalid"),
        "no head": (good, ["a", "b", "c", "d"], "carries no task head"),
    }
    return {
        name: (
            write_setfile(tmp_path / f"{name}.safetensors", prompts=p, users=u, metadata=meta),
            phrase,
        )
        for name, (p, u, phrase) in cases.items()
    }


def test_bad_files_are_refused_and_nothing_changes(
    client: TestClient, store: Store, store_redis: Redis, tmp_path: Path
) -> None:
    model_set(store, users=USERS)
    api = operator(client)
    before = stored(store_redis)
    for name, (path, phrase) in bad_files(tmp_path).items():
        with pytest.raises(BadRequest) as refused:
            api.import_file("tiny-gemma", path)
        assert refused.value.status == 422 and phrase in refused.value.detail, name
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(BadRequest, match="Not a prompt set file"):
        api.import_file("tiny-gemma", junk)
    with pytest.raises(NotFound, match="register it first"):
        api.import_file("nope", junk)
    assert stored(store_redis) == before


def test_a_file_without_head_may_reuse_a_versions_head(
    client: TestClient, store: Store, tmp_path: Path
) -> None:
    version, _ = model_set(store, users=USERS)
    path, _ = bad_files(tmp_path)["no head"]
    done = operator(client).import_file("tiny-gemma", path, head_from_version=version)
    assert done["count"] == 4
    assert store.get_head("tiny-gemma", done["version"]) == store.get_head("tiny-gemma", version)
    other = model_set(store, model="tiny-llama", users=USERS)[0]
    exported = operator(client).export("tiny-llama", other, tmp_path / "llama.safetensors")
    with pytest.raises(BadRequest, match="mean nothing to this model"):
        operator(client).import_file("tiny-gemma", exported)
