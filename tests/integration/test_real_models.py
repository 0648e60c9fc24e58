"""The real checkpoints of the asset cache (``make setup``): load, one training step."""

from __future__ import annotations

import pytest
import torch

from models import assets
from models.checkpoints import REAL_MODELS
from models.errors import CheckpointError
from models.foundation import FoundationModel
from models.tasks import get_task

pytestmark = pytest.mark.integration


def load_real(name: str) -> FoundationModel:
    if not (assets.model_dir(name) / "config.json").exists():
        pytest.fail(f"{name} is missing from the asset cache: run `make setup` first.")
    return FoundationModel.load(name)


@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_model_trains_a_prompt_with_finite_gradients(name: str) -> None:
    model = load_real(name)
    task = get_task("rating")
    prefixes = [task.template.prefix_for(t) for t in ("Toy Story (1995), Animation", "Heat (1995)")]
    start = torch.randn(2, 1, model.hidden_size) * model.embedding_std
    prompts = start.clone().requires_grad_()
    head = task.make_head(mean_target=3.5)
    optimizer = torch.optim.Adam([prompts, *head.parameters()], lr=1e-2)
    answer = model.answer_tokens(task.template.suffix, task.labels)
    logits = model.label_logits(prefixes, prompts, answer=answer)
    loss = task.loss(logits, head(logits), torch.tensor([5.0, 1.0]))
    loss.backward()
    assert torch.isfinite(loss)
    assert prompts.grad is not None and torch.isfinite(prompts.grad).all()
    assert prompts.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(prompts.detach(), start)


@pytest.mark.parametrize("task_name", ["rating", "binary"])
@pytest.mark.parametrize("name", REAL_MODELS)
def test_each_label_is_scored_where_the_model_predicts_it(name: str, task_name: str) -> None:
    """Both tokenizers spell " 1" as a space token and a digit: the space must run before the
    answer position, or the digit is scored where the model expects the space."""
    model = load_real(name)
    task = get_task(task_name)
    answer = model.answer_tokens(task.template.suffix, task.labels)
    for label, label_id in zip(task.labels, answer.label_ids, strict=True):
        spelled = model.token_ids(task.template.suffix + " " + label)
        assert [*answer.suffix_ids, label_id] == spelled, label
    with pytest.raises(CheckpointError, match="one distinct token"):
        model.answer_tokens(task.template.suffix, ("1", "10"))


@pytest.mark.parametrize("name", REAL_MODELS)
def test_cached_item_states_do_not_depend_on_what_else_was_missing(name: str) -> None:
    """bf16 CPU kernels round differently for small batches and other padded widths: a text
    cached alone must get the same states as when cached among others, short and long, or
    seeded training depends on the work done before it."""
    model = load_real(name)
    task = get_task("rating")
    genres = ", ".join(["Action", "Adventure", "Comedy", "Drama", "Film-Noir"] * 6)
    texts = [
        task.template.prefix_for(f"Movie number {i} ({1950 + i}), {genres[: 6 * i]}")
        for i in range(40)
    ]
    model.warm_prefixes(texts)  # the service's fill: full and part-filled chunks of several widths
    among_others = dict(model.prefix_cache.states)
    for text in (texts[0], texts[20], texts[-1]):
        model.prefix_cache.states.clear()
        model.warm_prefixes([text])
        assert torch.equal(model.prefix_cache.states[text], among_others[text]), text
