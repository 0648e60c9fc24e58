"""Applying a migration: users mapped and stored per second.

    python -m bench.apply --users 10000 --out bench/results/apply.json [--redis-url URL]

A PumaAdapter for SmolLM2-135M -> Gemma-3-270m widths (576 -> 640, hidden 256) maps ``--users``
random source prompts ``[1, 576]``; then the mapped prompts go into a new version the way the
workers write them (``workers.mapping.map_chunk`` then ``finalize``): per chunk of
``PM_CHUNK_SIZE`` users encode the rows, ``Store.write_prompts`` (pipelined, ``PM_WRITE_BATCH``
keys per round trip) and the chunk digest; then ``Store.seal_set``, which reads every value back,
verifies count and digest and marks the set readable. Reports users/s for mapping alone, for
storing (write + verify + seal) alone and end to end (both, one after the other, as one worker
does). Starts its own redis-server on a free port unless ``--redis-url``; the benchmark's set is
deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from prompt_migration_client import codec

from app.config import Settings
from app.store import SetMeta, Store, connect_redis
from bench.serving import local_redis
from models.adapter import AdapterConfig, PumaAdapter
from models.migration import map_prompts
from workers.sets import encode_rows

MODEL = "bench-apply"
D_IN, D_OUT, HIDDEN = 576, 640, 256  # SmolLM2-135M -> Gemma-3-270m, the adapter's default FFN
NOTE = (
    "CPU only, on a machine shared with other jobs (see cpu_count and loadavg); the mapping uses "
    "torch's intra-op threads, the store path is single-threaded Python plus redis-server on the "
    "same machine."
)


def rate(users: int, seconds: float) -> float:
    return round(users / seconds, 1) if seconds > 0 else 0.0


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings()
    chunk_size = args.chunk_size or settings.chunk_size
    write_batch = args.write_batch or settings.write_batch
    torch.manual_seed(args.seed)
    adapter = PumaAdapter(AdapterConfig(d_in=D_IN, d_out=D_OUT, hidden=HIDDEN)).eval()
    sources = torch.randn(args.users, 1, D_IN) * 0.02
    users = [f"u{i:07d}" for i in range(args.users)]
    load_before = os.getloadavg()

    map_prompts(adapter, sources[: min(256, args.users)])  # warm-up (allocations, kernels)
    t0 = time.perf_counter()
    mapped = map_prompts(adapter, sources, batch_size=args.map_batch)
    map_s = time.perf_counter() - t0
    assert mapped.shape == (args.users, 1, D_OUT)

    with local_redis(args.redis_url) as (redis_url, _):
        redis = connect_redis(redis_url, timeout_s=10)  # as the workers connect
        store = Store(redis, write_batch=write_batch)
        version = store.allocate_version(MODEL)
        meta = SetMeta(model=MODEL, version=version, task="rating", shape=[1, D_OUT],
                       dtype=args.dtype)  # fmt: skip
        t0 = time.perf_counter()
        store.begin_set(meta)
        store.put_head(MODEL, version, b"")
        encode_s = write_s = digest_s = 0.0
        chunk_digests: list[str] = []
        for start in range(0, args.users, chunk_size):
            t = time.perf_counter()
            chunk_users = users[start : start + chunk_size]
            items = encode_rows(chunk_users, mapped[start : start + chunk_size], dtype=args.dtype)
            t1 = time.perf_counter()
            store.write_prompts(MODEL, version, items)
            t2 = time.perf_counter()
            chunk_digests.append(codec.set_digest(items))
            t3 = time.perf_counter()
            encode_s, write_s, digest_s = encode_s + t1 - t, write_s + t2 - t1, digest_s + t3 - t2
        t4 = time.perf_counter()
        sealed = store.seal_set(
            MODEL,
            version,
            expected_count=args.users,
            expected_digest=codec.combine_digests(chunk_digests),
        )
        seal_s = time.perf_counter() - t4
        store_s = time.perf_counter() - t0
        assert sealed.count == args.users
        value_bytes = len(store.get_prompt(MODEL, version, users[0]) or b"")
        store.delete_set(MODEL, version)
        redis.close()

    total_s = map_s + store_s
    return {
        "benchmark": "apply",
        "config": {
            "users": args.users,
            "adapter": {
                "d_in": D_IN,
                "d_out": D_OUT,
                "hidden": HIDDEN,
                "params": sum(p.numel() for p in adapter.parameters()),
            },
            "source_shape": [1, D_IN],
            "target_shape": [1, D_OUT],
            "dtype": args.dtype,
            "value_bytes": value_bytes,
            "map_batch_size": args.map_batch,
            "chunk_size": chunk_size,
            "write_batch": write_batch,
            "torch_threads": torch.get_num_threads(),
            "redis": "external (--redis-url)" if args.redis_url else "own redis-server",
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "note": NOTE,
        "seconds": {
            "map": round(map_s, 4),
            "encode": round(encode_s, 4),
            "write": round(write_s, 4),
            "chunk_digest": round(digest_s, 4),
            "seal_verify": round(seal_s, 4),
            "store_total": round(store_s, 4),
            "end_to_end": round(total_s, 4),
        },
        "users_per_s": {
            "map": rate(args.users, map_s),
            "write": rate(args.users, encode_s + write_s + digest_s),
            "seal_verify": rate(args.users, seal_s),
            "store": rate(args.users, store_s),
            "end_to_end": rate(args.users, total_s),
        },
    }


def print_table(result: dict[str, Any]) -> None:
    cfg = result["config"]
    print(
        f"\nApply benchmark: {cfg['users']} users, adapter {cfg['adapter']['d_in']} -> "
        f"{cfg['adapter']['d_out']} (hidden {cfg['adapter']['hidden']}), {cfg['dtype']}, "
        f"chunk {cfg['chunk_size']}, write batch {cfg['write_batch']}, "
        f"{result['machine']['cpu_count']} CPUs, torch threads {cfg['torch_threads']}"
    )
    print(f"{'stage':<36}{'seconds':>10}{'users/s':>12}")
    print("-" * 58)
    s, r = result["seconds"], result["users_per_s"]
    rows = [
        ("map_prompts", s["map"], r["map"]),
        ("encode + write_prompts + digest", s["encode"] + s["write"] + s["chunk_digest"],
         r["write"]),
        ("seal_set (read back, verify, seal)", s["seal_verify"], r["seal_verify"]),
        ("store total (write + seal)", s["store_total"], r["store"]),
        ("end to end (map + store)", s["end_to_end"], r["end_to_end"]),
    ]  # fmt: skip
    for name, seconds, users_s in rows:
        print(f"{name:<36}{seconds:>10.3f}{users_s:>12.0f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--users", type=int, default=10000)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--map-batch", type=int, default=256, help="map_prompts batch_size")
    parser.add_argument("--chunk-size", type=int, default=None, help="default: PM_CHUNK_SIZE")
    parser.add_argument("--write-batch", type=int, default=None, help="default: PM_WRITE_BATCH")
    parser.add_argument("--redis-url", default=None, help="default: start a redis-server")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("users", "map_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("chunk_size", "write_batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
