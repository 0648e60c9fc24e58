"""The real checkpoints of the asset cache (``make setup``): load, one training step."""

from __future__ import annotations

import pytest
import torch

from models import assets
from models.foundation import FoundationModel
from models.registry import REAL_MODELS
from models.tasks import get_task

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_model_trains_a_prompt_with_finite_gradients(name: str) -> None:
    if not (assets.model_dir(name) / "config.json").exists():
        pytest.fail(f"{name} is missing from the asset cache: run `make setup` first.")
    model = FoundationModel.load(name)
    task = get_task("rating")
    prefixes = [task.template.prefix_for(t) for t in ("Toy Story (1995), Animation", "Heat (1995)")]
    start = torch.randn(2, 1, model.hidden_size) * model.embedding_std
    prompts = start.clone().requires_grad_()
    head = task.make_head(mean_target=3.5)
    optimizer = torch.optim.Adam([prompts, *head.parameters()], lr=1e-2)
    logits = model.label_logits(prefixes, prompts, suffix=task.template.suffix,
                                label_ids=model.label_token_ids(task.labels))  # fmt: skip
    loss = task.loss(logits, head(logits), torch.tensor([5.0, 1.0]))
    loss.backward()
    assert torch.isfinite(loss)
    assert prompts.grad is not None and torch.isfinite(prompts.grad).all()
    assert prompts.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(prompts.detach(), start)
