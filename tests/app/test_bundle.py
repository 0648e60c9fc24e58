"""The published inference contract of a sealed set: content, caching and refusals."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as load_tensors

from app.store import SetMeta, Store
from models.foundation import FoundationModel
from models.tasks import get_task
from tests.app.sets import model_set, tiny_width
from tests.conftest import reader


@pytest.mark.parametrize(("model", "task"), [("tiny-gemma", "rating"), ("tiny-llama", "binary")])
def test_bundle_describes_the_set(client: TestClient, store: Store, model: str, task: str) -> None:
    version, _ = model_set(store, model=model, task=task, length=2)
    response = client.get(f"/models/{model}/versions/{version}/bundle", headers=reader())
    assert response.status_code == 200, response.text
    doc = response.json()
    # fp32: in bf16 the embedding module's own scale buffer is rounded (6.9375 for sqrt(48)).
    loaded = FoundationModel.load(model, device="cpu", dtype=torch.float32)
    spec = get_task(task)
    answer = loaded.answer_tokens(spec.template.suffix, spec.labels)
    assert doc["task"]["label_token_ids"] == answer.label_ids
    assert doc["template"]["suffix_token_ids"] == answer.suffix_ids
    assert doc["template"]["prefix"] == spec.template.prefix
    assert doc["prompt"]["shape"] == [2, tiny_width(model)]
    assert doc["checkpoint"]["hidden_size"] == tiny_width(model)
    # Gemma scales its input embeddings by sqrt(d); Llama does not.
    assert doc["scale"]["input_scale"] == pytest.approx(loaded.embed_scale, rel=1e-6)
    want_scale = math.sqrt(tiny_width(model)) if model == "tiny-gemma" else 1.0
    assert doc["scale"]["input_scale"] == pytest.approx(want_scale)
    assert doc["lineage"]["kind"] == "train" and doc["metrics"] == {"test": {"rmse": 1.0}}
    head = client.get(f"/models/{model}/versions/{version}/head", headers=reader())
    assert hashlib.sha256(head.content).hexdigest() == doc["head"]["sha256"]
    shapes = {k: list(v.shape) for k, v in load_tensors(head.content).items()}
    assert shapes == {k: v["shape"] for k, v in doc["head"]["tensors"].items()}


def test_bundle_is_immutable_and_revalidates(client: TestClient, store: Store) -> None:
    version, _ = model_set(store)
    path = f"/models/tiny-gemma/versions/{version}/bundle"
    first = client.get(path, headers=reader())
    assert "immutable" in first.headers["Cache-Control"]
    etag = first.headers["ETag"]
    again = client.get(path, headers=reader() | {"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    assert client.get(path, headers=reader()).headers["ETag"] == etag
    other, _ = model_set(store, seed=1)
    other_etag = client.get(f"/models/tiny-gemma/versions/{other}/bundle", headers=reader())
    assert other_etag.headers["ETag"] != etag  # another head, another contract


def test_unknown_and_unsealed_sets_are_refused(client: TestClient, store: Store) -> None:
    version, _ = model_set(store)
    unknown_model = client.get("/models/nope/versions/1/bundle", headers=reader())
    assert unknown_model.status_code == 404
    assert "tiny-gemma" in unknown_model.json()["detail"]
    unknown_version = client.get("/models/tiny-gemma/versions/99/bundle", headers=reader())
    assert unknown_version.status_code == 404
    assert f"['{version}']" in unknown_version.json()["detail"]
    writing = store.allocate_version("tiny-gemma")
    store.begin_set(SetMeta(model="tiny-gemma", version=writing, task="rating", shape=[1, 48]))
    unsealed = client.get(f"/models/tiny-gemma/versions/{writing}/bundle", headers=reader())
    assert unsealed.status_code == 409 and "not sealed" in unsealed.json()["detail"]
    head = client.get(f"/models/tiny-gemma/versions/{writing}/head", headers=reader())
    assert head.status_code == 409
    assert client.get(f"/models/tiny-gemma/versions/{version}/bundle").status_code == 401
