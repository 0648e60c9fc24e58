from pathlib import Path

import pytest
import torch

from models.errors import CheckpointError, ShapeMismatchError, UnknownModelError
from models.foundation import AnswerTokens, FoundationModel
from models.tasks import Task

ITEMS = ["item3 comedy", "item12 drama action 1995", "item7"]


@pytest.mark.parametrize("length", [1, 3, 8])
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_prefix_reuse_scores_and_differentiates_like_the_full_forward(
    fixture: str, length: int, rating: Task, request: pytest.FixtureRequest
) -> None:
    model: FoundationModel = request.getfixturevalue(fixture)
    prefixes = [rating.template.prefix_for(item) for item in ITEMS]  # different lengths: padding
    prompts = torch.randn(len(ITEMS), length, model.hidden_size) * 0.05
    answer = model.answer_tokens(rating.template.suffix, rating.labels)
    with torch.no_grad():
        inferred = model.label_logits(prefixes, prompts, answer=answer)
    assert inferred.shape == (len(ITEMS), 5)
    _assert_prefix_reuse_matches_full_forward(model, prefixes, prompts, answer=answer)
    torch.testing.assert_close(
        inferred, model.label_logits_full(prefixes, prompts, answer=answer), atol=1e-4, rtol=1e-4
    )


def _assert_prefix_reuse_matches_full_forward(
    model: FoundationModel, prefixes: list[str], prompts: torch.Tensor, *, answer: AnswerTokens
) -> None:
    """Same scores and same gradient in the prompts (the cached prefix's own attention path)."""
    scores, gradients = [], []
    for score in (model.label_logits, model.label_logits_full):
        leaf = prompts.clone().requires_grad_()
        scores.append(score(prefixes, leaf, answer=answer))
        (scores[-1] * torch.arange(1.0, 1.0 + scores[-1].shape[1])).sum().backward()
        gradients.append(leaf.grad)
    torch.testing.assert_close(scores[0], scores[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gradients[0], gradients[1], atol=1e-4, rtol=1e-3)


def test_scores_depend_on_the_prompt_and_its_gradient_is_finite(
    tiny_gemma: FoundationModel, rating: Task
) -> None:
    prefixes = [rating.template.prefix_for(item) for item in ITEMS]
    prompts = (torch.randn(3, 1, tiny_gemma.hidden_size) * 0.05).requires_grad_()
    answer = tiny_gemma.answer_tokens(rating.template.suffix, rating.labels)
    logits = tiny_gemma.label_logits(prefixes, prompts, answer=answer)
    logits.sum().backward()
    assert prompts.grad is not None and torch.isfinite(prompts.grad).all()
    assert prompts.grad.abs().sum() > 0


def test_frozen_weights_get_no_gradient(tiny_llama: FoundationModel) -> None:
    assert not any(p.requires_grad for p in tiny_llama.model.parameters())


def test_prompts_of_another_width_are_refused(tiny_llama: FoundationModel, rating: Task) -> None:
    with pytest.raises(ShapeMismatchError, match="Migrate them"):
        tiny_llama.label_logits(
            ["x"],
            torch.zeros(1, 1, tiny_llama.hidden_size + 1),
            answer=AnswerTokens(suffix_ids=[1], label_ids=[1]),
        )


def test_unknown_model_name_says_what_exists() -> None:
    with pytest.raises(UnknownModelError, match="tiny-llama"):
        FoundationModel.load("llama-9000")


def test_checkpoint_without_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights"):
        FoundationModel.load(str(tmp_path))


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json"):
        FoundationModel.load(str(tmp_path))


def test_prefixes_around_the_sliding_window_score_like_the_full_forward(
    tiny_gemma: FoundationModel, rating: Task
) -> None:
    """Gemma-3's local layers see the last ``sliding_window`` tokens only. Prefixes shorter and
    longer than the window, cached in one batch (the short ones padded to the longest), score
    as the plain forward does."""
    window = int(tiny_gemma.model.config.sliding_window)
    items = [" ".join(ITEMS * repeats) for repeats in (1, window // 3, window // 6, window // 4)]
    prefixes = [rating.template.prefix_for(item) for item in items]
    assert max(len(tiny_gemma.token_ids(p, special=True)) for p in prefixes) > window
    tiny_gemma.warm_prefixes(prefixes)
    answer = tiny_gemma.answer_tokens(rating.template.suffix, rating.labels)
    for length in (1, 8):
        prompts = torch.randn(len(prefixes), length, tiny_gemma.hidden_size) * 0.05
        _assert_prefix_reuse_matches_full_forward(tiny_gemma, prefixes, prompts, answer=answer)
