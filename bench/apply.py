"""Applying a migration: the chunk path's users/s, as one worker runs it, per chunk size.

    python -m bench.apply --users 100000 --chunk-sizes 256,1024,4096,16384 \\
        --out bench/results/apply.json [--redis-url URL]

A source set of ``--users`` random prompts ``[1, 576]`` fp32 (SmolLM2-135M's width) is imported
the way every set is written (``Store.write_complete_set``), and an adapter of the default
recipe's shape (``models.recipe.ALL_USERS``: 64 principal directions, network width 64) for
Gemma-3-270m's width 640 is stored as a job's adapter. Then, for each chunk size, in one process
with the worker's own functions: the plan (``workers.mapping.plan_users``, streaming over the
source's users), every chunk (``workers.mapping.map_chunk``: MGET the sources, decode, map under
``PM_MAP_THREADS`` torch threads, encode, MSET + SADD, read back and digest), the seal
(``Store.seal_set``: counts from the chunks, no value read again) and the version's deletion
(``Store.delete_set``, incremental UNLINKs). ``--repeat`` rounds over the sizes, interleaved;
each size reports its median round's users/s per step, the CPU the chunk path spent per user in
this process and in redis-server (what a quiet machine's rate follows from), and the process's
peak RSS. Starts its own redis-server on a free port unless ``--redis-url``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prompt_migration_client import codec

from app.config import Settings
from app.store import SetMeta, Store, connect_redis
from bench import write_result
from bench.serving import cpu_seconds, local_redis
from models.adapter import AdapterConfig, PumaAdapter, fold
from models.adapter.model import adapter_to_bytes
from models.recipe import ALL_USERS
from workers import context
from workers.context import JobRun
from workers.mapping import MAP_PART, map_chunk, plan_users, torch_threads

SOURCE, TARGET = "bench-source", "bench-target"
D_IN, D_OUT = 576, 640  # SmolLM2-135M -> Gemma-3-270m
NOTE = (
    "CPU only, on a machine shared with other jobs (see cpu_count and loadavg); one worker "
    "process (torch threads: PM_MAP_THREADS) and redis-server on the same machine."
)


def rate(users: int, seconds: float) -> float:
    return round(users / seconds, 1) if seconds > 0 else 0.0


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def seed_source(store: Store, *, users: int, seed: int) -> dict[str, str]:
    """The source set, written in batches of 10,000 random rows."""
    version = store.allocate_version(SOURCE)
    meta = SetMeta(model=SOURCE, version=version, task="rating", shape=[1, D_IN])
    rng = np.random.default_rng(seed)

    def batches() -> Any:
        for start in range(0, users, 10_000):
            n = min(10_000, users - start)
            rows = (rng.standard_normal((n, 1, D_IN), dtype=np.float32) * 0.02).astype("<f4")
            yield [(f"u{start + i:08d}", rows[i].tobytes()) for i in range(n)]

    store.write_complete_set(meta, head=b"", batches=batches())
    return {"model": SOURCE, "version": version}


def recipe_adapter(seed: int) -> PumaAdapter:
    torch.manual_seed(seed)
    config = AdapterConfig(
        d_in=D_IN, d_out=D_OUT, hidden=ALL_USERS.hidden, input_rank=ALL_USERS.input_rank
    )
    adapter = PumaAdapter(config).eval()
    adapter.set_input_statistics(torch.randn(4096, 1, D_IN) * 0.02)
    return adapter


def new_job(
    store: Store,
    *,
    source: dict[str, str],
    chunk_size: int,
    adapter: bytes,
    dtype: str,
    settings: Settings,
) -> JobRun:
    job_id = uuid.uuid4().hex
    version = store.allocate_version(TARGET)
    record = {
        "id": job_id,
        "kind": "migration",
        "state": "running",
        "stage": "mapping",
        "request": {
            "sources": [source],
            "target": TARGET,
            "dataset": "synthetic-tiny",
            "chunk_size": chunk_size,
            "dtype": dtype,
        },
        "sources": [source],
        "target": {"model": TARGET, "version": version},
        "created_at": time.time(),
    }
    store.create_job(record, idempotency_key=None, request_hash="")
    store.put_blob(job_id, "adapter", adapter)
    store.begin_set(
        SetMeta(model=TARGET, version=version, task="rating", shape=[1, D_OUT], dtype=dtype)
    )
    return JobRun(job_id, settings=settings)


def run_size(
    store: Store,
    *,
    source: dict[str, str],
    users: int,
    chunk_size: int,
    adapter: bytes,
    dtype: str,
    settings: Settings,
    redis_pids: list[int],
) -> dict[str, Any]:
    job = new_job(
        store, source=source, chunk_size=chunk_size, adapter=adapter, dtype=dtype, settings=settings
    )
    model, version = job.target
    t0 = time.perf_counter()
    plan_users(job, sources=[source])
    job.update(users_total=store.planned_users(job.id))
    t1, cpu0, redis0 = time.perf_counter(), os.times(), cpu_seconds(redis_pids)
    for index in range(store.plan_size(job.id)):
        map_chunk(job, index)
    t2, cpu1, redis1 = time.perf_counter(), os.times(), cpu_seconds(redis_pids)
    worker_cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    redis_cpu = None if redis0 is None or redis1 is None else redis1 - redis0
    done = store.chunks_done(job.id)
    sealed = store.seal_set(
        model,
        version,
        expected_count=sum(c for c, _ in done.values()),
        expected_digest=codec.combine_digests(d for _, d in done.values()),
    )
    t3 = time.perf_counter()
    assert sealed.count == users, (sealed.count, users)
    store.delete_set(model, version)
    t4 = time.perf_counter()
    store.drop_plan(job.id)
    return {
        "chunk_size": chunk_size,
        "chunks": len(done),
        "seconds": {
            "plan": round(t1 - t0, 3),
            "map_chunks": round(t2 - t1, 3),
            "seal": round(t3 - t2, 3),
            "delete": round(t4 - t3, 3),
        },
        "users_per_s": {
            "plan": rate(users, t1 - t0),
            "chunk_path": rate(users, t2 - t1),
            "seal": rate(users, t3 - t2),
            "delete": rate(users, t4 - t3),
            "plan_map_seal": rate(users, t3 - t0),
        },
        # CPU the chunk path spent per user, whatever else ran on the machine meanwhile.
        "chunk_path_cpu_us_per_user": {
            "worker": round(worker_cpu / users * 1e6, 2),
            "redis": None if redis_cpu is None else round(redis_cpu / users * 1e6, 2),
        },
    }


def map_cost(adapter: PumaAdapter, *, threads: int, users: int = 16_384) -> dict[str, float]:
    """CPU µs per user of the map alone, the adapter's own forward pass against the folded form
    the chunk tasks use, in parts of ``MAP_PART`` users on the chunk tasks' torch threads; the
    best of three passes."""
    rows = torch.randn(users, 1, D_IN) * 0.02
    cost = {}
    with torch_threads(threads), torch.inference_mode():
        for name, form in (("adapter", adapter.eval()), ("folded", fold(adapter))):
            passes = []
            for _ in range(3):
                start = time.thread_time()
                for i in range(0, users, MAP_PART):
                    form(rows[i : i + MAP_PART])
                passes.append(time.thread_time() - start)
            cost[name] = round(min(passes) / users * 1e6, 2)
    return cost


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round whose chunk path was the median, with every round's chunk-path rate."""
    ranked = sorted(runs, key=lambda r: r["users_per_s"]["chunk_path"])
    middle = dict(ranked[len(ranked) // 2])
    middle["chunk_path_users_per_s_rounds"] = [r["users_per_s"]["chunk_path"] for r in runs]
    return middle


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(environment="test")
    adapter = recipe_adapter(args.seed)
    load_before = os.getloadavg()
    with local_redis(args.redis_url) as (redis_url, redis_pids):
        redis = connect_redis(redis_url, timeout_s=10)  # as the workers connect
        store = Store(redis, write_batch=settings.write_batch)
        context._store = store  # the workers' stages use this store
        t0 = time.perf_counter()
        source = seed_source(store, users=args.users, seed=args.seed)
        import_s = time.perf_counter() - t0
        blob = adapter_to_bytes(adapter)
        # Rounds over the sizes, interleaved, so that a burst of load elsewhere on the machine
        # does not land on one size alone; each size reports its median round.
        rounds = [
            [
                run_size(
                    store,
                    source=source,
                    users=args.users,
                    chunk_size=size,
                    adapter=blob,
                    dtype=args.dtype,
                    settings=settings,
                    redis_pids=redis_pids,
                )
                for size in args.chunk_sizes
            ]
            for _ in range(args.repeat)
        ]
        runs = [median_run([r[i] for r in rounds]) for i in range(len(args.chunk_sizes))]
        store.delete_set(source["model"], source["version"])
        redis.close()
    best = max(runs, key=lambda r: r["users_per_s"]["chunk_path"])
    return {
        "benchmark": "apply",
        "config": {
            "users": args.users,
            "adapter": {
                "d_in": D_IN,
                "d_out": D_OUT,
                "hidden": adapter.config.hidden,
                "input_rank": adapter.config.input_rank,
                "params": sum(p.numel() for p in adapter.parameters()),
            },
            "source_shape": [1, D_IN],
            "target_shape": [1, D_OUT],
            "dtype": args.dtype,
            "value_bytes": {
                "source": 4 * D_IN,
                "target": codec.numpy_dtype(args.dtype).itemsize * D_OUT,
            },
            "map_threads": settings.map_threads,
            "repeat": args.repeat,
            "redis": "external (--redis-url)" if args.redis_url else "own redis-server",
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "torch": torch.__version__,
            # What the kernels used: ATEN_CPU_CAPABILITY can hold them below the CPU's own.
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "platform": platform.platform(),
        },
        "note": NOTE,
        "import_users_per_s": rate(args.users, import_s),
        "map_cpu_us_per_user": map_cost(adapter, threads=settings.map_threads),
        "runs": runs,
        "best_chunk_size": best["chunk_size"],
        "peak_rss_mb": peak_rss_mb(),
    }


def print_table(result: dict[str, Any]) -> None:
    cfg = result["config"]
    print(
        f"\nApply benchmark: {cfg['users']} users, adapter {D_IN} -> {D_OUT} (rank "
        f"{cfg['adapter']['input_rank']}, hidden {cfg['adapter']['hidden']}), {cfg['dtype']}, "
        f"{result['machine']['cpu_count']} CPUs, map threads {cfg['map_threads']}; "
        f"import {result['import_users_per_s']:.0f} users/s"
    )
    print(f"{'chunk':>8}{'plan':>10}{'chunks':>10}{'seal':>10}{'delete':>10}   users/s")
    for r in result["runs"]:
        u = r["users_per_s"]
        print(
            f"{r['chunk_size']:>8}{u['plan']:>10.0f}{u['chunk_path']:>10.0f}{u['seal']:>10.0f}"
            f"{u['delete']:>10.0f}"
        )
    cost = result["map_cpu_us_per_user"]
    print(f"map alone, CPU µs/user: adapter {cost['adapter']}, folded {cost['folded']}")
    print(f"best chunk size {result['best_chunk_size']}; peak RSS {result['peak_rss_mb']} MB")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument(
        "--chunk-sizes",
        default="256,1024,4096,16384",
        help="comma-separated chunk sizes to time, each on a new version",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default="float32",
        help="the new set's stored dtype",
    )
    parser.add_argument("--redis-url", default=None, help="default: start a redis-server")
    parser.add_argument("--repeat", type=int, default=3, help="rounds over the chunk sizes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.users < 1 or args.repeat < 1:
        parser.error("--users and --repeat must be >= 1")
    try:
        args.chunk_sizes = [int(s) for s in args.chunk_sizes.split(",") if s.strip()]
    except ValueError:
        parser.error("--chunk-sizes takes integers, e.g. 1024,4096")
    if not args.chunk_sizes or min(args.chunk_sizes) < 1:
        parser.error("--chunk-sizes needs at least one size >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
