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
