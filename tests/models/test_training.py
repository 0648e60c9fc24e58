import pytest
import torch

from models.data import Splits
from models.foundation import FoundationModel
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
        runs.append(train_prompts(tiny_llama, rating, tiny_splits, config=config,
                                  users=tiny_splits.users[:6]).prompt_set)  # fmt: skip
    torch.testing.assert_close(runs[1].prompts, runs[0].prompts, rtol=0, atol=0)
    for name, value in runs[0].head.items():
        torch.testing.assert_close(runs[1].head[name], value, rtol=0, atol=0, msg=name)
