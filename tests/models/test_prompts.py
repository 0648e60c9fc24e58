import pytest
import torch

from models.errors import InvalidPromptError, ShapeMismatchError
from models.prompts import PromptSet


def make(prompts: torch.Tensor, users: list[str] | None = None) -> PromptSet:
    users = users or [f"u{i}" for i in range(len(prompts))]
    return PromptSet("m", "rating", users, prompts, {"w": torch.ones(2)})


def test_bytes_round_trip() -> None:
    original = make(torch.randn(4, 2, 8))
    restored = PromptSet.from_bytes(original.to_bytes())
    assert restored.user_ids == original.user_ids and restored.model == "m"
    torch.testing.assert_close(restored.prompts, original.prompts)
    torch.testing.assert_close(restored.head["w"], original.head["w"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_prompts_name_the_users(bad: float) -> None:
    prompts = torch.zeros(3, 1, 4)
    prompts[1, 0, 2] = bad
    with pytest.raises(InvalidPromptError, match="u1"):
        make(prompts)


def test_shape_and_duplicate_users_are_refused() -> None:
    with pytest.raises(ShapeMismatchError):
        make(torch.zeros(3, 4))
    with pytest.raises(ShapeMismatchError, match="twice"):
        make(torch.zeros(2, 1, 4), ["a", "a"])
    with pytest.raises(ShapeMismatchError, match="no prompt"):
        make(torch.zeros(2, 1, 4)).rows(["zz"])
