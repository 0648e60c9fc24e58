"""Cost of scoring with the per-item prefix reuse against the plain full-sequence forward.

    python -m bench.prefix_cache --out bench/results/prefix-cache.json [--models smollm2-135m ...]

For each model: milliseconds per example of a training step (forward + backward to the prompt)
and of inference, at batch 32 on real MovieLens item texts, both ways interleaved in one run,
and the cached step once more through transformers' SDPA instead of ``models.attention``.
The one-off cost of filling the cache is reported separately; with ``--warm-all``, also for every
MovieLens-100K item: the reproducible fill (full batches padded to a width set by each text's own
length) against a tight one (texts sorted by length, each batch padded to its longest, no fillers),
whose states depend on the batch-mates. With ``--fills``, the reproducible fill at each given
batch rows x width multiple, in turn (and nothing else): a cold fill of 256 items, then 6 more, as
a job's later calls warm a few new items at a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from models import attention as prefix_attention
from models.data import load_interactions
from models.foundation import FoundationModel
from models.tasks import get_task


def _interleaved_medians(steps: dict[str, Callable[[], None]], *, repeats: int) -> dict[str, float]:
    """Median seconds of each step, the steps taken in turn in every round: slow drifts of the
    machine (other load, the allocator's state) fall on all of them alike."""
    for step in steps.values():
        step()  # warm-up
    samples: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            start = time.perf_counter()
            step()
            samples[label].append(time.perf_counter() - start)
    return {label: statistics.median(times) for label, times in samples.items()}


def _fill_tight(model: FoundationModel, texts: list[str], *, batch: int = 64) -> None:
    """Cache ``texts`` with the least padding: sorted by length, no filler rows."""
    encoded = sorted(
        ((model.token_ids(t, special=True), t) for t in texts), key=lambda e: len(e[0])
    )
    for start in range(0, len(encoded), batch):
        chunk = encoded[start : start + batch]
        width = max(len(ids) for ids, _ in chunk)
        texts = [t for _, t in chunk]
        model.prefix_cache.states |= model._prefix_states(texts, [ids for ids, _ in chunk], width)


def warm_all_items(model: FoundationModel, texts: list[str]) -> dict[str, float]:
    """Seconds to cache every one of ``texts``, reproducibly and tightly."""
    texts = sorted(set(texts))
    seconds: dict[str, float] = {}
    for label, fill in (
        ("reproducible", model.warm_prefixes),
        ("tight", partial(_fill_tight, model)),
    ):
        model.prefix_cache.states.clear()
        start = time.perf_counter()
        fill(texts)
        seconds[label] = time.perf_counter() - start
    model.prefix_cache.states.clear()
    return {
        "warm_all_items": len(texts),
        "warm_all_reproducible_s": round(seconds["reproducible"], 1),
        "warm_all_tight_s": round(seconds["tight"], 1),
        "warm_all_ratio": round(seconds["reproducible"] / seconds["tight"], 2),
    }


@dataclass(frozen=True)
class FillTiming:
    round: int
    fill: tuple[int, int]  # batch rows, width multiple
    cold_ms_per_item: float
    six_more_s: float


def compare_fills(
    model: FoundationModel, texts: list[str], *, fills: list[tuple[int, int]], rounds: int = 2
) -> list[FillTiming]:
    """Seconds to warm 256 of ``texts`` from an empty cache, then 6 more, at each fill; the fills
    taken in turn in every round, so a drift of the machine falls on all of them."""
    texts = sorted(set(texts))
    cold, more = texts[:256], texts[256:262]
    rows = []
    for round_index in range(rounds):
        for batch_size, width_multiple in fills:
            warm = partial(
                model.warm_prefixes, batch_size=batch_size, width_multiple=width_multiple
            )
            model.prefix_cache.states.clear()
            start = time.perf_counter()
            warm(cold)
            cold_s = time.perf_counter() - start
            start = time.perf_counter()
            warm(more)
            rows.append(
                FillTiming(
                    round=round_index,
                    fill=(batch_size, width_multiple),
                    cold_ms_per_item=round(cold_s / len(cold) * 1e3, 1),
                    six_more_s=round(time.perf_counter() - start, 2),
                )
            )
    model.prefix_cache.states.clear()
    return rows


def _item_prefixes() -> list[str]:
    """The rating task's prefix of every MovieLens-100K interaction's item."""
    task = get_task("rating")
    rows = load_interactions("movielens-100k", task="rating")
    return [task.template.prefix_for(r.item_text) for r in rows]


def measure_fills(name: str, *, fills: list[tuple[int, int]]) -> dict[str, object]:
    """``compare_fills`` on the model ``name`` over the MovieLens-100K items."""
    model = FoundationModel.load(name)
    by_fill = compare_fills(model, _item_prefixes(), fills=fills)
    return {"model": name, "dtype": str(model.dtype), "fills": [asdict(t) for t in by_fill]}


def measure(name: str, *, batch: int, repeats: int, warm_all: bool = False) -> dict[str, object]:
    task = get_task("rating")
    items = _item_prefixes()
    prefixes = items[:batch]
    model = FoundationModel.load(name)
    extra = warm_all_items(model, items) if warm_all else {}
    answer = model.answer_tokens(task.template.suffix, task.labels)
    prompts = torch.randn(batch, 1, model.hidden_size) * model.embedding_std
    start = time.perf_counter()
    model.warm_prefixes(prefixes)
    fill = time.perf_counter() - start
    result: dict[str, object] = {
        "model": name,
        "dtype": str(model.dtype),
        "batch": batch,
        "cache_fill_ms_per_item": round(fill / len(set(prefixes)) * 1e3, 2),
    }
    variants = (
        ("prefix_reuse", model.label_logits, prefix_attention.NAME),
        # The same cached step through transformers' SDPA, whose backward also writes gradients
        # for the cached keys and values: what models.attention saves.
        ("prefix_reuse_sdpa", model.label_logits, "sdpa"),
        ("full_forward", model.label_logits_full, prefix_attention.NAME),
    )
    steps: dict[str, Callable[[], None]] = {}
    for label, score, attention in variants:

        def train_step(
            score: Callable[..., torch.Tensor] = score, attention: str = attention
        ) -> None:
            model.model.set_attn_implementation(attention)
            p = prompts.clone().requires_grad_()
            score(prefixes, p, answer=answer).sum().backward()

        def infer(score: Callable[..., torch.Tensor] = score, attention: str = attention) -> None:
            model.model.set_attn_implementation(attention)
            with torch.no_grad():
                score(prefixes, prompts, answer=answer)

        steps[f"{label}_train_ms"], steps[f"{label}_infer_ms"] = train_step, infer
    timings = {
        label: seconds / batch * 1e3
        for label, seconds in _interleaved_medians(steps, repeats=repeats).items()
    }
    result |= {k: round(v, 2) for k, v in timings.items()}
    for kind in ("train", "infer"):
        ratio = timings[f"full_forward_{kind}_ms"] / timings[f"prefix_reuse_{kind}_ms"]
        result[f"{kind}_speedup"] = round(ratio, 2)
    sdpa_ratio = timings["prefix_reuse_sdpa_train_ms"] / timings["prefix_reuse_train_ms"]
    result["train_speedup_over_sdpa"] = round(sdpa_ratio, 2)
    return result | extra


def _fill(text: str) -> tuple[int, int]:
    rows, _, width = text.partition("x")
    try:
        return int(rows), int(width)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a fill as ROWSxWIDTH, e.g. 16x16"
        ) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma-3-270m"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--warm-all",
        action="store_true",
        help="also time caching every MovieLens-100K item, two ways",
    )
    parser.add_argument(
        "--fills",
        type=_fill,
        nargs="+",
        default=None,
        help="time only the reproducible fill at each ROWSxWIDTH (e.g. 64x64 16x16)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's own)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.fills:
        results = [measure_fills(m, fills=args.fills) for m in args.models]
    else:
        results = [
            measure(m, batch=args.batch, repeats=args.repeats, warm_all=args.warm_all)
            for m in args.models
        ]
    for r in results:
        print(json.dumps(r))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
