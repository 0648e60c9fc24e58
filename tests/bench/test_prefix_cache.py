"""The fill comparison of the prefix-cache benchmark runs on a tiny model, and every forward of a
fill has exactly its rows, padded to a multiple of its width."""

from __future__ import annotations

import argparse

import pytest
import torch

from bench.prefix_cache import _fill, compare_fills
from models.foundation import FoundationModel
from models.tasks import get_task


def test_each_fill_warms_in_its_own_batches() -> None:
    model = FoundationModel.load("tiny-gemma", device="cpu", dtype=torch.float32)
    template = get_task("rating").template
    texts = [template.prefix_for(f"movie {i} " + "drama " * (i % 7)) for i in range(270)]
    shapes: list[tuple[int, int]] = []
    model.decoder.register_forward_hook(
        lambda _, args, kwargs, out: shapes.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )

    rows = compare_fills(model, texts, fills=[(8, 16), (4, 32)], rounds=1)

    assert [r.fill for r in rows] == [(8, 16), (4, 32)]
    assert {batch for batch, _ in shapes} == {8, 4}
    by_rows = {batch: {width for b, width in shapes if b == batch} for batch in (8, 4)}
    assert all(width % 16 == 0 for width in by_rows[8])
    assert all(width % 32 == 0 for width in by_rows[4])
    assert not model.prefix_cache.states  # the comparison leaves no states behind


def test_a_fill_is_rows_by_width() -> None:
    assert _fill("16x16") == (16, 16)
    with pytest.raises(argparse.ArgumentTypeError, match="ROWSxWIDTH"):
        _fill("16")
