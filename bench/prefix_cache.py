"""Cost of scoring with the per-item prefix reuse against the plain full-sequence forward.

    python -m bench.prefix_cache --out bench/results/prefix-cache.json [--models smollm2-135m ...]

For each model: milliseconds per example of a training step (forward + backward to the prompt)
and of inference, at batch 32 on real MovieLens item texts, both ways, interleaved in one run.
The one-off cost of filling the cache is reported separately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from models.data import load_interactions
from models.foundation import FoundationModel
from models.tasks import get_task


def _time(step: Callable[[], None], *, repeats: int) -> float:
    step()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(name: str, *, batch: int, repeats: int) -> dict[str, object]:
    task = get_task("rating")
    rows = load_interactions("movielens-100k", task="rating")[: batch * 4]
    prefixes = [task.template.prefix_for(r.item_text) for r in rows][:batch]
    model = FoundationModel.load(name)
    answer = model.answer_tokens(task.template.suffix, task.labels)
    prompts = torch.randn(batch, 1, model.hidden_size) * model.embedding_std
    start = time.perf_counter()
    model.warm_prefixes(prefixes)
    fill = time.perf_counter() - start
    result: dict[str, object] = {"model": name, "dtype": str(model.dtype), "batch": batch,
                                 "cache_fill_ms_per_item": round(fill / len(set(prefixes)) * 1e3, 2)}  # fmt: skip
    timings: dict[str, float] = {}
    for label, score in (
        ("prefix_reuse", model.label_logits),
        ("full_forward", model.label_logits_full),
    ):

        def train_step(score: Callable[..., torch.Tensor] = score) -> None:
            p = prompts.clone().requires_grad_()
            score(prefixes, p, answer=answer).sum().backward()

        def infer(score: Callable[..., torch.Tensor] = score) -> None:
            with torch.no_grad():
                score(prefixes, prompts, answer=answer)

        timings[f"{label}_train_ms"] = _time(train_step, repeats=repeats) / batch * 1e3
        timings[f"{label}_infer_ms"] = _time(infer, repeats=repeats) / batch * 1e3
    result |= {k: round(v, 2) for k, v in timings.items()}
    for kind in ("train", "infer"):
        ratio = timings[f"full_forward_{kind}_ms"] / timings[f"prefix_reuse_{kind}_ms"]
        result[f"{kind}_speedup"] = round(ratio, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma-3-270m"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = [measure(m, batch=args.batch, repeats=args.repeats) for m in args.models]
    for r in results:
        print(json.dumps(r))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
