import pytest
import torch

from models.data import Splits
from models.errors import DataError
from models.evaluation import evaluate
from models.foundation import FoundationModel
from models.migration import MigrationConfig, train_adapter
from models.tasks import Task
from models.training import PromptTrainingConfig, init_prompts, train_prompts


def test_shared_start_puts_every_user_at_the_same_real_token(tiny_llama: FoundationModel) -> None:
    config = PromptTrainingConfig(prompt_length=3)
    prompts = init_prompts(tiny_llama, n_users=4, config=config)
    assert prompts.shape == (4, 3, tiny_llama.hidden_size)
    torch.testing.assert_close(prompts[0], prompts[3])
    rows = tiny_llama.embedding_table.float().cpu()
    assert any(torch.equal(prompts[0, 0], row) for row in rows)


def test_random_start_gives_users_different_tokens(tiny_llama: FoundationModel) -> None:
    config = PromptTrainingConfig(init="random", seed=3)
    prompts = init_prompts(tiny_llama, n_users=8, config=config)
    assert len({tuple(p.flatten().tolist()) for p in prompts}) > 1
    torch.testing.assert_close(prompts, init_prompts(tiny_llama, n_users=8, config=config))


def test_config_names_the_allowed_starts() -> None:
    with pytest.raises(ValueError, match="'shared' or 'random'"):
        PromptTrainingConfig(init="zeros")  # type: ignore[arg-type]


def test_training_reproduces_from_its_seed_whatever_ran_before(
    tiny_llama: FoundationModel, rating: Task, tiny_splits: Splits
) -> None:
    config = PromptTrainingConfig(epochs=1, seed=5)
    runs = []
    for unrelated in (1, 2):  # a worker process has drawn other numbers before each job
        torch.manual_seed(unrelated)
        torch.rand(unrelated)
        runs.append(
            train_prompts(
                tiny_llama, rating, tiny_splits, config=config, users=tiny_splits.users[:6]
            ).prompt_set
        )
    torch.testing.assert_close(runs[1].prompts, runs[0].prompts, rtol=0, atol=0)
    for name, value in runs[0].head.items():
        torch.testing.assert_close(runs[1].head[name], value, rtol=0, atol=0, msg=name)


def test_users_without_training_data_are_refused_not_returned_untrained(
    tiny_llama: FoundationModel, tiny_gemma: FoundationModel, rating: Task, tiny_splits: Splits
) -> None:
    users = [*tiny_splits.users[:2], "ghost"]
    with pytest.raises(DataError, match=r"1 of 3 users have no training .* \(ghost\)"):
        train_prompts(
            tiny_llama, rating, tiny_splits, config=PromptTrainingConfig(epochs=1), users=users
        )
    source = train_prompts(
        tiny_llama, rating, tiny_splits, config=PromptTrainingConfig(epochs=1), users=users[:2]
    ).prompt_set
    for selected in (users, []):
        with pytest.raises(DataError, match=r"ghost|No users"):
            train_adapter(
                sources=[source],
                target=tiny_gemma,
                task=rating,
                splits=tiny_splits,
                users=selected,
                config=MigrationConfig(epochs=1, hidden=8),
            )
    metrics = evaluate(tiny_llama, rating, source, tiny_splits.test)
    assert metrics["n_users_without_prompt"] == len(tiny_splits.users) - 2
    assert metrics["n_users"] == 2
