"""PEFT prompt-tuning adapters in and out, checked with the real ``peft`` package."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel, PromptTuningConfig, TaskType, get_peft_model
from prompt_migration_client import BadRequest, ContractError, contract, setfile
from prompt_migration_client.builders import InputBuilder
from prompt_migration_client.operator import OperatorClient
from prompt_migration_client.peft import adapters_to_setfile, setfile_to_adapters
from redis import Redis
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from app.store import Store
from models.checkpoints import resolve_checkpoint
from tests.app.sets import model_set
from tests.app.test_transfer import stored
from tests.conftest import ADMIN

SCALE = 48**0.5  # tiny-gemma's input scale


def base_model() -> PreTrainedModel:
    path = resolve_checkpoint("tiny-gemma")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def peft_adapters(root: Path, users: list[str]) -> dict[str, np.ndarray]:
    """One adapter per user, written by PEFT itself; returns their vectors (model-input space)."""
    vectors = {}
    for seed, user in enumerate(users):
        model = get_peft_model(
            base_model(), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=2)
        )
        encoder: Any = model.prompt_encoder["default"]
        weight = encoder.embedding.weight
        weight.data = torch.randn(
            tuple(weight.shape), generator=torch.Generator().manual_seed(seed)
        )
        model.save_pretrained(str(root / user))
        vectors[user] = weight.detach().numpy().copy()
    return vectors


def test_peft_adapters_import_only_for_the_templates_place(
    client: TestClient, store: Store, store_redis: Redis, tmp_path: Path
) -> None:
    head_version, _ = model_set(store, length=2)
    api = OperatorClient(token=ADMIN, http=client)
    vectors = peft_adapters(tmp_path / "peft", ["u1", "u2", "u3"])
    unplaced = adapters_to_setfile(tmp_path / "peft", tmp_path / "a.safetensors", task="rating")
    before = stored(store_redis)
    with pytest.raises(BadRequest, match="prepends its virtual tokens"):
        api.import_file("tiny-gemma", unplaced, head_from_version=head_version)
    assert stored(store_redis) == before
    placed = adapters_to_setfile(
        tmp_path / "peft", tmp_path / "b.safetensors", task="rating", placement="template"
    )
    done = api.import_file("tiny-gemma", placed, head_from_version=head_version)
    values = store.get_prompts("tiny-gemma", done["version"], ["u1", "u2", "u3"])
    for user, value in zip(["u1", "u2", "u3"], values, strict=True):
        assert value is not None
        raw = np.frombuffer(value, "<f4").reshape(2, 48)
        np.testing.assert_allclose(raw * SCALE, vectors[user], rtol=1e-6, atol=1e-6)
    assert done["lineage"]["format"] == "peft"


def test_exported_adapters_load_in_peft_and_come_back(
    client: TestClient, store: Store, tmp_path: Path
) -> None:
    version, prompts = model_set(store, length=2, users=["u1", "u2"])
    api = OperatorClient(token=ADMIN, http=client)
    exported = api.export("tiny-gemma", version, tmp_path / "set.safetensors")
    with pytest.raises(ContractError, match="PeftModel would predict differently"):
        setfile_to_adapters(exported, tmp_path / "out")
    folders = setfile_to_adapters(exported, tmp_path / "out", placement="template")
    loaded = PeftModel.from_pretrained(base_model(), str(folders[0]))
    in_peft = loaded.get_prompt_embedding_to_save("default").detach().numpy()
    np.testing.assert_allclose(in_peft, prompts["u1"] * SCALE, rtol=1e-6)
    # Why the stamp matters: PEFT's own forward puts the vectors first, the template after the
    # item, and the two give different answers.
    bundle = api.bundle("tiny-gemma", version)
    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint("tiny-gemma"))
    builder = InputBuilder(bundle, model=base_model(), tokenizer=tokenizer)
    item = "Heat (1995), Action Crime"
    ids = tokenizer(bundle.prefix_for(item))["input_ids"] + bundle.suffix_token_ids
    with torch.no_grad():
        prepended = loaded(input_ids=torch.tensor([ids])).logits[0, -1, bundle.label_token_ids]
    spliced = builder.label_logits(prompts["u1"], item)
    assert not torch.allclose(prepended, spliced, atol=1e-3)
    back = adapters_to_setfile(tmp_path / "out", tmp_path / "back.safetensors", task="rating")
    done = api.import_file("tiny-gemma", back, head_from_version=version)  # stamped: no flag
    (value,) = store.get_prompts("tiny-gemma", done["version"], ["u2"])
    assert value is not None
    np.testing.assert_allclose(
        np.frombuffer(value, "<f4").reshape(2, 48), prompts["u2"], rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("user", ["../escaped", "..", ".", "ABSOLUTE", "a/b", "caf\u00e9"])
def test_export_never_writes_outside_its_folder(tmp_path: Path, user: str) -> None:
    user = str(tmp_path / "absolute") if user == "ABSOLUTE" else user
    bundle = {
        "prompt": {"shape": [1, 4]},
        "scale": {"input_scale": 1.0},
        "checkpoint": {"name": "tiny-gemma"},
    }
    source = setfile.write_setfile(
        tmp_path / "set.safetensors",
        prompts=np.ones((2, 1, 4), dtype=np.float32),
        users=["ok", user.encode("ascii", "replace").decode()],
        metadata={"space": contract.RAW, "bundle": json.dumps(bundle)},
    )
    (tmp_path / "out").mkdir()
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ContractError, match="cannot name a folder"):
        setfile_to_adapters(source, tmp_path / "out", placement="template")
    assert sorted(tmp_path.rglob("*")) == before


def test_export_refuses_a_link_out_of_its_folder(tmp_path: Path) -> None:
    bundle = {
        "prompt": {"shape": [1, 4]},
        "scale": {"input_scale": 1.0},
        "checkpoint": {"name": "tiny-gemma"},
    }
    source = setfile.write_setfile(
        tmp_path / "set.safetensors",
        prompts=np.ones((1, 1, 4), dtype=np.float32),
        users=["linked"],
        metadata={"space": contract.RAW, "bundle": json.dumps(bundle)},
    )
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ContractError, match="cannot name a folder"):
        setfile_to_adapters(source, tmp_path / "out", placement="template")
    assert list((tmp_path / "elsewhere").iterdir()) == []
