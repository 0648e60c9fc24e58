"""The client's builders on the tiny models: the service's predictions from the contract alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from prompt_migration_client import ContractError, PromptClient
from prompt_migration_client.builders import InputBuilder, Predictor
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from app.store import Store
from models.checkpoints import resolve_checkpoint
from models.data import Interaction
from models.evaluation import predict_set
from models.foundation import FoundationModel
from models.tasks import get_task
from tests.app.sets import model_set
from tests.conftest import READER
from workers.pipeline import load_set

ITEMS = ["Heat (1995), Action Crime", "Toy Story (1995), Animation", "Fargo (1996), Drama"]


def checkpoint(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = resolve_checkpoint(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize(("name", "task"), [("tiny-gemma", "rating"), ("tiny-llama", "binary")])
def test_predictions_built_from_http_answers_equal_the_services(
    client: TestClient, store: Store, name: str, task: str
) -> None:
    version, _ = model_set(store, model=name, task=task, length=2)
    api = PromptClient(token=READER, http=client)
    model, tokenizer = checkpoint(name)
    predictor = Predictor(api, model_name=name, version=version, model=model, tokenizer=tokenizer)
    users = ["u1", "u2", "u3"]
    interactions = {u: [Interaction(u, t, t, 1.0, 0.0) for t in ITEMS] for u in users}
    service = predict_set(
        FoundationModel.load(name, device="cpu", dtype=torch.float32),
        get_task(task),
        load_set(name, version, db=store),
        interactions,
    )
    ours = [predictor.predict(u, t) for u in users for t in ITEMS]
    assert service.user_ids == [u for u in users for _ in ITEMS]
    np.testing.assert_allclose(ours, service.predictions, atol=1e-5)
    assert np.ptp(service.predictions) > 1e-4  # users and items do move the prediction


def test_vllm_embeddings_give_the_services_logits(client: TestClient, store: Store) -> None:
    version, prompts = model_set(store, model="tiny-gemma", length=2)
    bundle = PromptClient(token=READER, http=client).bundle("tiny-gemma", version)
    model, tokenizer = checkpoint("tiny-gemma")
    builder = InputBuilder(bundle, model=model, tokenizer=tokenizer)
    embeds = builder.prompt_embeds(prompts["u1"], ITEMS[0])
    prefix_ids = tokenizer(bundle.prefix_for(ITEMS[0]))["input_ids"]
    assert embeds.shape == (len(prefix_ids) + 2 + len(bundle.suffix_token_ids), 48)
    assert torch.equal(builder.inputs_embeds(prompts["u1"], ITEMS[0])[0], embeds)
    # The prompt rows carry sqrt(d), as token rows do after Gemma's embedding module.
    scaled = torch.from_numpy(prompts["u1"]) * 48**0.5
    torch.testing.assert_close(embeds[len(prefix_ids) : len(prefix_ids) + 2], scaled)
    service = FoundationModel.load("tiny-gemma", device="cpu", dtype=torch.float32)
    spec = get_task("rating")
    answer = service.answer_tokens(spec.template.suffix, spec.labels)
    want = service.label_logits_full(
        [spec.template.prefix_for(ITEMS[0])], torch.from_numpy(prompts["u1"])[None], answer=answer
    )[0]
    torch.testing.assert_close(builder.label_logits_of(embeds), want, atol=1e-5, rtol=1e-5)


def test_a_checkpoint_of_another_space_is_refused(client: TestClient, store: Store) -> None:
    version, _ = model_set(store, model="tiny-gemma")
    bundle = PromptClient(token=READER, http=client).bundle("tiny-gemma", version)
    llama, tokenizer = checkpoint("tiny-llama")
    with pytest.raises(ContractError, match="does not fit"):
        InputBuilder(bundle, model=llama, tokenizer=tokenizer)
    gemma, tokenizer = checkpoint("tiny-gemma")
    with pytest.raises(ContractError, match="shape"):
        InputBuilder(bundle, model=gemma, tokenizer=tokenizer).predict(np.zeros((2, 48)), "x")
