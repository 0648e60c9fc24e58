"""Issue 43's 1+N attempt in the quality benchmark: a shared LoRA timed and trained on tiny models."""

from __future__ import annotations

import copy

import torch
from torch import nn

from bench import quality
from models.foundation import FoundationModel
from models.tasks import get_task


def test_the_lora_trains_only_its_own_weights_and_leaves_cached_prefixes_frozen() -> None:
    model = FoundationModel.load("tiny-llama", device="cpu", dtype=torch.float32)
    frozen = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    task = get_task("rating")
    answer = model.answer_tokens(task.template.suffix, task.labels)
    prefixes = ["#Question: a film", "#Question: another film"]
    model.warm_prefixes(prefixes)
    cached = {t: s.clone() for t, s in model.prefix_cache.states.items()}
    prompts = model.raw_embeddings(torch.tensor([[1], [2]]))
    before = model.label_logits(prefixes, prompts, answer=answer).detach()
    lora = quality.add_shared_lora(model, rank=4)
    assert lora and all(p.requires_grad and p.dtype == torch.float32 for p in lora)
    # lora_B starts at zero: injecting changes nothing until it trains
    assert torch.allclose(model.label_logits(prefixes, prompts, answer=answer), before, atol=1e-5)
    optimizer = torch.optim.Adam(lora, lr=1e-2)
    for _ in range(3):
        loss = model.label_logits(prefixes, prompts, answer=answer).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.label_logits(prefixes, prompts, answer=answer).detach()
    assert not torch.allclose(after, before)
    for name, param in model.model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    assert all(torch.equal(model.prefix_cache.states[t], s) for t, s in cached.items())


def test_smoke_preset_times_and_trains_the_one_plus_n_variant() -> None:
    result = quality.shared_lora(quality.PRESETS["smoke"], mode="train", batches=1, epochs=2)
    cost = result["cost"]
    assert isinstance(cost, dict)
    for name in ("prompt", "lora_suffix", "lora_full"):
        assert cost[f"{name}_step_s_per_example"] > 0
        assert cost[f"{name}_epoch_s"] > 0
    shared = result["shared"]
    assert isinstance(shared, dict) and shared["epochs"] == 2
    assert shared["best_epoch"] in (0, 1) and 1 <= len(shared["history"]) <= 2
    for part in ("shared", "retrain_on_lora"):
        test = result[part]["test"]  # type: ignore[index]
        assert test["rmse"] > 0 and "within_user_corr" in test


def test_the_shared_lora_can_adapt_the_target_model() -> None:
    preset = quality.PRESETS["smoke"]
    result = quality.shared_lora(preset, mode="cost", batches=1, on="target")
    assert result["model"] == preset.target_model
    assert isinstance(result["lora"], dict) and result["lora"]["parameters"] > 0


def test_the_best_epochs_snapshot_restores_the_shared_lora() -> None:
    lora = [nn.Parameter(torch.zeros(2, 2))]
    head = quality._HeadWithLora(nn.Linear(5, 1), lora)
    saved = copy.deepcopy(head.state_dict())
    with torch.no_grad():
        lora[0].add_(1.0)
    head.load_state_dict(saved)
    assert torch.equal(lora[0], torch.zeros(2, 2))
