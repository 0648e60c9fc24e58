"""Task heads: the affine map a head can absorb into its first layer."""

from __future__ import annotations

import pytest
import torch

from models.tasks import get_task


@pytest.mark.parametrize(
    ("task_name", "n_labels", "n_features"), [("rating", 5, 5), ("binary", 2, 1)]
)
def test_a_precomposed_head_reads_features_as_the_head_read_their_affine_map(
    task_name: str, n_labels: int, n_features: int
) -> None:
    task = get_task(task_name)
    head = task.make_head(mean_target=0.5, seed=3)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(n_features, n_features, generator=generator)
    bias = torch.randn(n_features, generator=generator)
    logits = torch.randn(64, n_labels, generator=generator)
    expected = head.read(head.features(logits) @ weight + bias)
    head.precompose(weight, bias)
    torch.testing.assert_close(head(logits), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("task_name", "n_labels"), [("rating", 5), ("binary", 2)])
def test_weighted_loss_counts_an_example_of_weight_two_as_two_examples(
    task_name: str, n_labels: int
) -> None:
    task = get_task(task_name)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, n_labels, generator=generator)
    head_out = torch.randn(3, generator=generator)
    targets = (
        torch.tensor([1.0, 4.0, 5.0]) if task_name == "rating" else torch.tensor([0.0, 1.0, 1.0])
    )
    repeated = [0, 0, 1, 2]  # example 0 twice
    unweighted = task.loss(logits[repeated], head_out[repeated], targets[repeated])
    weighted = task.loss(logits, head_out, targets, torch.tensor([2.0, 1.0, 1.0]))
    torch.testing.assert_close(weighted, unweighted)
    even = task.loss(logits, head_out, targets, torch.full((3,), 0.5))
    torch.testing.assert_close(even, task.loss(logits, head_out, targets))


def test_the_rating_cross_entropy_fits_a_given_class_distribution() -> None:
    """One-hot classes of the labels score as the labels themselves; a blend of two
    distributions scores as the same blend of their cross-entropies."""
    task = get_task("rating")
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, generator=generator)
    head_out = torch.randn(4, generator=generator)
    targets = torch.tensor([1.0, 2.0, 4.0, 5.0])
    one_hot = torch.from_numpy(task.classes(targets.numpy()))
    assert one_hot.argmax(dim=1).tolist() == [0, 1, 3, 4]
    torch.testing.assert_close(
        task.loss(logits, head_out, targets, classes=one_hot), task.loss(logits, head_out, targets)
    )
    soft = torch.softmax(torch.randn(4, 5, generator=generator), dim=1)
    mse = 0.8 * torch.nn.functional.mse_loss(head_out, targets)
    ce_label = task.loss(logits, head_out, targets, classes=one_hot) - mse
    ce_soft = task.loss(logits, head_out, targets, classes=soft) - mse
    blended = task.loss(logits, head_out, targets, classes=0.25 * one_hot + 0.75 * soft) - mse
    torch.testing.assert_close(blended, 0.25 * ce_label + 0.75 * ce_soft)
