"""The per-item states kept on disk: read back bit for bit by another process's model, never
computed again, and never taken from another model, fill or damaged file."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from models.foundation import FoundationModel
from models.prefix_cache import SHARD_SUFFIX, PrefixCache
from models.tasks import Task

ITEMS = ["item1 comedy", "item2 drama", "item3 horror (1990)", "item4 sci fi animation"]


def _load(name: str, state_dir: Path) -> FoundationModel:
    return FoundationModel.load(name, device="cpu", dtype=torch.float32, state_dir=state_dir)


def _forwards(model: FoundationModel) -> list[int]:
    """A counter of the model's forward passes (a hook on its decoder)."""
    calls: list[int] = []
    model.decoder.register_forward_hook(lambda *_: calls.append(1))
    return calls


def _prefixes(rating: Task) -> list[str]:
    return [rating.template.prefix_for(item) for item in ITEMS]


def test_a_new_model_reads_the_states_back_and_scores_the_same(
    tmp_path: Path, rating: Task
) -> None:
    prefixes = _prefixes(rating)
    first = _load("tiny-gemma", tmp_path)
    first.warm_prefixes(prefixes)
    assert len(list(tmp_path.rglob(f"*{SHARD_SUFFIX}"))) == 1

    second = _load("tiny-gemma", tmp_path)  # as a restarted worker would
    forwards = _forwards(second)
    second.warm_prefixes(prefixes)
    assert forwards == []
    assert first.prefix_cache.compute_seconds > 0 and second.prefix_cache.compute_seconds == 0
    for text in prefixes:
        assert torch.equal(second.prefix_cache.states[text], first.prefix_cache.states[text])

    answer = first.answer_tokens(rating.template.suffix, rating.labels)
    prompts = torch.randn(len(prefixes), 2, first.hidden_size) * 0.05
    with torch.no_grad():
        expected = first.label_logits(prefixes, prompts, answer=answer)
        assert torch.equal(second.label_logits(prefixes, prompts, answer=answer), expected)


def test_only_the_missing_texts_are_computed_and_kept(tmp_path: Path, rating: Task) -> None:
    prefixes = _prefixes(rating)
    _load("tiny-gemma", tmp_path).warm_prefixes(prefixes[:2])
    model = _load("tiny-gemma", tmp_path)
    forwards = _forwards(model)
    model.warm_prefixes(prefixes)
    assert len(forwards) == 1  # the two new texts, in one batch
    assert len(list(tmp_path.rglob(f"*{SHARD_SUFFIX}"))) == 2


def test_states_are_kept_apart_by_model_and_by_fill(tmp_path: Path, rating: Task) -> None:
    prefixes = _prefixes(rating)
    _load("tiny-gemma", tmp_path).warm_prefixes(prefixes)

    other_model = _load("tiny-llama", tmp_path)
    forwards = _forwards(other_model)
    other_model.warm_prefixes(prefixes)
    assert forwards  # computed: the other model's states are not these
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2

    other_fill = _load("tiny-gemma", tmp_path)
    forwards = _forwards(other_fill)
    other_fill.warm_prefixes(prefixes, batch_size=8)
    assert forwards  # another fill rounds differently on bf16 kernels: computed again


def test_a_damaged_shard_is_recomputed(tmp_path: Path, rating: Task) -> None:
    prefixes = _prefixes(rating)
    first = _load("tiny-gemma", tmp_path)
    first.warm_prefixes(prefixes)
    (shard,) = tmp_path.rglob(f"*{SHARD_SUFFIX}")
    shard.write_bytes(b"\x00" * 16)

    second = _load("tiny-gemma", tmp_path)
    forwards = _forwards(second)
    second.warm_prefixes(prefixes)
    assert forwards
    for text in prefixes:
        assert torch.equal(second.prefix_cache.states[text], first.prefix_cache.states[text])


def test_a_directory_that_cannot_be_written_costs_only_the_reuse(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    cache = PrefixCache(directory=blocked / "states")
    state = torch.ones(2, 2, 1, 3, 4)
    cache.add({"text": state}, fill=(64, 64), seconds=0.5)
    assert cache.missing(["text", "other"], fill=(64, 64)) == ["other"]
    assert cache.compute_seconds == 0.5


def test_the_kept_states_stay_under_their_bound_used_longest_ago_deleted_first(
    tmp_path: Path,
) -> None:
    state = torch.ones(2, 2, 1, 3, 64)  # about 3 KB as a shard
    model_a, model_b = tmp_path / ("a" * 24), tmp_path / ("b" * 24)  # as state_fingerprint names
    weights = tmp_path / "checkpoint" / "model.safetensors"  # not a kept state
    weights.parent.mkdir()
    weights.write_bytes(b"\0" * 100_000)
    cache = PrefixCache(directory=model_a)
    cache.add({"probe": state}, fill=(64, 64), seconds=0.0)
    (probe,) = model_a.glob(f"*{SHARD_SUFFIX}")
    shard_bytes = probe.stat().st_size
    probe.unlink()

    bounded = PrefixCache(directory=model_a, max_bytes=3 * shard_bytes)
    other_model = PrefixCache(directory=model_b, max_bytes=3 * shard_bytes)
    for n, cache in enumerate([bounded, bounded, other_model, bounded]):
        cache.add({f"text{n}": state * n}, fill=(64, 64), seconds=0.0)
        time.sleep(0.01)  # distinct modification times
    # Reading text1's shard back marks it used: the next write deletes text2's instead.
    reader = PrefixCache(directory=model_a)
    assert reader.missing(["text1"], fill=(64, 64)) == []
    time.sleep(0.01)
    bounded.add({"text4": state * 4}, fill=(64, 64), seconds=0.0)

    shards = [*model_a.glob(f"*{SHARD_SUFFIX}"), *model_b.glob(f"*{SHARD_SUFFIX}")]
    assert sum(s.stat().st_size for s in shards) <= 3 * shard_bytes
    assert weights.stat().st_size == 100_000  # the bound counts and deletes kept states only
    fresh_a = PrefixCache(directory=model_a)
    fresh_b = PrefixCache(directory=model_b)
    assert fresh_a.missing(["text0", "text1", "text3", "text4"], fill=(64, 64)) == ["text0"]
    assert fresh_b.missing(["text2"], fill=(64, 64)) == ["text2"]
    assert torch.equal(fresh_a.states["text4"], state * 4)


def test_a_shard_deleted_after_it_was_listed_is_computed_again(tmp_path: Path) -> None:
    state = torch.ones(2, 2, 1, 3, 4)
    PrefixCache(directory=tmp_path).add({"text": state}, fill=(64, 64), seconds=0.0)
    reader = PrefixCache(directory=tmp_path)
    assert reader.missing(["other"], fill=(64, 64)) == ["other"]  # lists the shard
    for shard in tmp_path.glob(f"*{SHARD_SUFFIX}"):
        shard.unlink()
    assert reader.missing(["text"], fill=(64, 64)) == ["text"]
