"""Serving: raw Redis, the plainest FastAPI endpoint and the API's reads, in one run.

    python -m bench.serving --out bench/results/serving.json [--users 2000 --concurrency 16
        --seconds 10 --batch-size 64 --api-workers 1,2 --redis-url URL --cluster]

Starts its own redis-server on a free port (unless ``--redis-url``; with ``--cluster`` a
three-node Redis Cluster), writes ``--users`` random prompts ``[1, 640]`` fp32 (Gemma's width)
into a sealed, active set through ``app.store.Store`` (the workers' write path), then measures,
each for ``--seconds`` at ``--concurrency`` connections, with C load generators:

1. ``raw_redis_get``: ``redis-benchmark`` GETs of the prompt keys (the store's own speed);
2. ``raw_redis_pipeline``: the same, ``--batch-size`` GETs per pipeline;
   ``raw_client_get`` and ``direct_redis``: a plain GET on the client library's asyncio client and
   its atomic read (the API's read function) from one asyncio process (bench/direct_read.py);
3. ``minimal_fastapi``: ``wrk`` against bench/minimal_app.py, FastAPI + redis.asyncio returning
   the bytes (the floor any Python API reaches here);
4. ``api_single``: ``wrk``, ``GET /users/{id}/prompt`` of the real API (raw bytes);
5. ``api_batch``: ``wrk``, ``POST /prompts/batch`` with ``--batch-size`` users per request;
6. ``api_batch_safetensors``: the same batches as one safetensors tensor (``?format=``);

3-6 under uvicorn with each ``--api-workers`` count (phases with more than one worker are named
``<phase>_<n>_workers``). Then the memory Redis spends per stored prompt against its raw bytes,
fp32 and fp16 at d = 576 and 640. Generator, API and Redis share the machine's cores: every
phase records the CPU seconds each of them used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
from prompt_migration_client import codec
from redis import Redis
from redis.cluster import RedisCluster

from app.dev.local_redis import LocalRedis, LocalRedisCluster, free_port
from app.dev.processes import exit_on_sigterm
from app.store import SetMeta, Store, connect_redis
from app.store.keys import value_key_prefix
from bench import direct_read, loadgen, write_result
from bench.loadgen import Load, user_id

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench-serving"
WIDTH = 640  # Gemma-3-270m's hidden size
NOTE = (
    "Load generators (wrk, redis-benchmark), the API and redis-server run on the same machine "
    "and share its cores; cpu_seconds per phase shows what each used. Compare ratios within "
    "one run, not absolute numbers across machines."
)


@contextlib.contextmanager
def local_redis(
    url: str | None = None, *, cluster: bool = False
) -> Iterator[tuple[str, list[int]]]:
    """``url`` as given, else a throwaway redis-server (or Cluster) on free ports: ``(url, pids)``,
    no pids for ``url``."""
    if url:
        yield url, []
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed; install it or pass --redis-url.")
    with tempfile.TemporaryDirectory(prefix="pm-bench-redis-") as workdir:
        servers = (LocalRedisCluster if cluster else LocalRedis)(binary, Path(workdir))
        try:
            servers.start()
            yield servers.url(), servers.pids
        finally:
            servers.stop()


def cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU of processes and their direct children (uvicorn workers), from /proc."""
    if not pids:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        # fields[0] is state: ppid is fields[1], utime fields[11], stime fields[12]
        if int(entry.name) in pids or int(fields[1]) in pids:
            total += (int(fields[11]) + int(fields[12])) / tick
    return round(total, 3)


def seed_prompts(
    store: Store, *, model: str, users: int, width: int, dtype: str, seed: int, activate: bool
) -> tuple[str, int]:
    """A sealed set of ``users`` prompts ``[1, width]``: (version, bytes per value)."""
    store.put_model(model, {"name": model, "checkpoint": model, "registered_at": time.time()})
    version = store.allocate_version(model)
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((users, 1, width)) * 0.04
    items = [(user_id(i), codec.encode(values[i], dtype)) for i in range(users)]
    meta = SetMeta(model=model, version=version, task="rating", shape=[1, width], dtype=dtype)
    store.write_complete_set(meta, head=b"", batches=[items])
    if activate:
        # Not made the default model: a --redis-url run must not change what other readers get.
        store.activate(model, version, make_default=False)
    return version, len(items[0][1])


def production_env(redis_url: str, *, broker_url: str, admin: str, read: str) -> dict[str, str]:
    """The API's (and a worker's) settings as a deployment gives them: production, its Redis, the
    broker, both tokens."""
    return {
        "PM_ENVIRONMENT": "production",
        "PM_REDIS_URL": redis_url,
        "PM_BROKER_URL": broker_url,
        "PM_RESULT_BACKEND": broker_url,
        "PM_ADMIN_TOKEN": admin,
        "PM_READ_TOKEN": read,
    }


class Uvicorn:
    """``uvicorn APP`` as a subprocess with ``workers`` processes, as in production."""

    def __init__(self, app: str, *, env: dict[str, str], workers: int, log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1"]
        args += ["--port", str(self.port), "--workers", str(workers), "--log-level", "warning"]
        args += ["--no-access-log"]
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                args, cwd=ROOT, env=os.environ | env, stdout=out, stderr=out
            )

    def wait_ready(self, path: str, *, headers: dict[str, str], size: int) -> None:
        """Until every worker can answer ``path`` with ``size`` bytes (a few tries per worker)."""
        deadline = time.monotonic() + 120
        answered = 0
        while answered < 20:
            if self.proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited: {self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not answer: {self.log.read_text()[-3000:]}")
            try:
                response = httpx.get(self.base + path, headers=headers, timeout=5)
            except httpx.HTTPError:
                time.sleep(0.2)
                continue
            if response.status_code != 200 or len(response.content) != size:
                raise RuntimeError(f"{path} answered {response.status_code}: {response.text}")
            answered += 1

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def summary(load: Load, *, items_per_request: int, cpu: dict[str, float | None]) -> dict[str, Any]:
    """One phase in the JSON's shape."""
    rps = load.requests_per_s
    return {
        "requests": load.requests,
        "errors": load.errors,
        "seconds": round(load.seconds, 3),
        "items_per_request": items_per_request,
        "requests_per_s": round(rps, 1),
        "items_per_s": round(rps * items_per_request, 1),
        "latency_ms": load.latency_ms,
        "cpu_seconds": cpu | {"load_generator": load.cpu_seconds},
    }


def _spent(first: float | None, last: float | None) -> float | None:
    return None if first is None or last is None else round(last - first, 2)


class Bench:
    """The phases of one run against one seeded Redis."""

    def __init__(self, args: argparse.Namespace, *, redis_url: str, redis_pids: list[int]) -> None:
        self.args = args
        self.redis_url = redis_url
        self.redis_pids = redis_pids
        self.measurements: dict[str, dict[str, Any]] = {}

    def _timed(
        self, name: str, run: Callable[[], Load], *, items: int, api_pids: list[int]
    ) -> None:
        before = {"api": cpu_seconds(api_pids), "redis": cpu_seconds(self.redis_pids)}
        load = run()
        after = {"api": cpu_seconds(api_pids), "redis": cpu_seconds(self.redis_pids)}
        cpu = {k: _spent(before[k], after[k]) for k in after}
        self.measurements[name] = summary(load, items_per_request=items, cpu=cpu)
        m = self.measurements[name]
        print(
            f"  {name}: {m['requests_per_s']:.0f} req/s, {m['items_per_s']:.0f} prompts/s, "
            f"p50 {m['latency_ms']['p50']} ms, p99 {m['latency_ms']['p99']} ms",
            flush=True,
        )

    def raw_redis(self, redis: Redis | RedisCluster, key_prefix: str) -> None:
        url = urlparse(self.redis_url)
        host, port, db = url.hostname or "127.0.0.1", url.port or 6379, 0
        if isinstance(redis, RedisCluster):
            # The set's keys share one hash tag: the node of that slot serves them all.
            node = redis.get_node_from_key(key_prefix)
            host, port = node.host, node.port
        else:
            db = int((url.path or "/0").lstrip("/") or 0)
        a = self.args

        def gets(pipeline: int, requests: int) -> Load:
            return loadgen.redis_benchmark(
                host=host,
                port=port,
                db=db,
                key_prefix=key_prefix,
                users=a.users,
                connections=a.concurrency,
                requests=requests,
                pipeline=pipeline,
            )

        for name, pipeline in (("raw_redis_get", 1), ("raw_redis_pipeline", a.batch_size)):
            # The warm-up run also sizes the timed one to about --seconds.
            warm = gets(pipeline, 2000 * pipeline)
            requests = max(1000, int(warm.requests_per_s * a.seconds)) * pipeline
            self._timed(name, partial(gets, pipeline, requests), items=pipeline, api_pids=[])

    def direct(self, *, version: str, value_bytes: int) -> None:
        """A plain GET on the client library's client and its atomic read, straight from Redis."""
        a = self.args
        for name, atomic in (("raw_client_get", False), ("direct_redis", True)):
            run = direct_read.read_rate(
                self.redis_url,
                atomic=atomic,
                cluster=a.cluster,
                model=MODEL,
                version=version,
                users=a.users,
                value_bytes=value_bytes,
                concurrency=a.concurrency,
                seconds=a.seconds,
                warmup_s=a.warmup,
            )
            self._timed(name, partial(asyncio.run, run), items=1, api_pids=[])

    def http(self, name: str, server: Uvicorn, *, mode: str, token: str, model: str) -> None:
        a = self.args
        batch = 1 if mode == "single" else a.batch_size

        def load(seconds: float) -> Load:
            return loadgen.wrk(
                server.base,
                mode=mode,
                token=token,
                model=model,
                users=a.users,
                batch=batch,
                connections=a.concurrency,
                seconds=seconds,
            )

        if a.warmup > 0:
            load(a.warmup)
        self._timed(name, lambda: load(a.seconds), items=batch, api_pids=[server.proc.pid])


def serve(bench: Bench, *, workers: int, version: str, value_bytes: int, logdir: Path) -> None:
    """The minimal endpoint and the API's reads under ``workers`` uvicorn processes."""
    a = bench.args
    suffix = "" if workers == 1 else f"_{workers}_workers"
    probe = f"/users/{user_id(0)}/prompt?model={MODEL}"
    base_env = {"PM_REDIS_URL": bench.redis_url, "PM_REDIS_CLUSTER": str(a.cluster).lower()}
    minimal = Uvicorn(
        "bench.minimal_app:app",
        env=base_env | {"PM_BENCH_KEY_PREFIX": value_key_prefix(MODEL, version)},
        workers=workers,
        log=logdir / "minimal.log",
    )
    try:
        minimal.wait_ready(probe, headers={}, size=value_bytes)
        bench.http(f"minimal_fastapi{suffix}", minimal, mode="single", token="-", model=MODEL)
    finally:
        minimal.stop()
    token = secrets.token_urlsafe(32)
    broker = a.broker_url or bench.redis_url
    api = Uvicorn(
        "app.main:app",
        env=base_env
        | production_env(
            bench.redis_url, broker_url=broker, admin=secrets.token_urlsafe(32), read=token
        ),
        workers=workers,
        log=logdir / "api.log",
    )
    try:
        api.wait_ready(probe, headers={"Authorization": f"Bearer {token}"}, size=value_bytes)
        bench.http(f"api_single{suffix}", api, mode="single", token=token, model=MODEL)
        bench.http(f"api_batch{suffix}", api, mode="batch", token=token, model=MODEL)
        bench.http(
            f"api_batch_safetensors{suffix}", api, mode="safetensors", token=token, model=MODEL
        )
    finally:
        api.stop()


def memory_per_prompt(redis: Redis | RedisCluster, *, users: int) -> list[dict[str, Any]]:
    """``MEMORY USAGE`` of a stored prompt (key, value and Redis's own bookkeeping) against the
    value's raw bytes, for each dtype and width, on sets written through the store; and, as a
    candidate layout, the same prompts in buckets: one string of slots and one index each."""
    store = Store(redis)
    rows = []
    for width in (576, 640):
        for dtype in ("float32", "float16"):
            model = f"bench-memory-{width}-{dtype}"
            version, value_bytes = seed_prompts(
                store, model=model, users=users, width=width, dtype=dtype, seed=1, activate=False
            )
            prefix = value_key_prefix(model, version)
            ids = [user_id(i) for i in range(users)]
            per_prompt = _mean_usage(redis, [prefix + u for u in ids], users=users)
            # The candidate layout's keys are not the set's: measured on a single Redis only.
            size, slots = (
                _slot_bucket_usage(redis, prefix, ids) if isinstance(redis, Redis) else (0, None)
            )
            rows.append(
                {
                    "width": width,
                    "dtype": dtype,
                    "value_bytes": value_bytes,
                    "key_bytes": len(prefix + ids[0]),
                    "memory_usage_bytes": round(per_prompt, 1),
                    "overhead": round(per_prompt / value_bytes, 4),
                    "slot_bucket_users": size or None,
                    "slot_buckets_bytes": None if slots is None else round(slots, 1),
                    "slot_buckets_overhead": None
                    if slots is None
                    else round(slots / value_bytes, 4),
                }
            )
            store.delete_set(model, version)
    return rows


# Users per bucket of the candidate layout: the allocator rounds a bucket up to its size class,
# so the benchmark picks the count in this range whose bucket fills its class best.
BUCKET_RANGE = range(32, 129)


def _mean_usage(redis: Redis | RedisCluster, keys: list[str], *, users: int) -> float:
    """Bytes per user of ``keys`` (each key's MEMORY USAGE, all samples), over ``users``."""
    usage = [redis.memory_usage(key, samples=0) for key in keys]
    if None in usage:
        raise RuntimeError("a key written for the memory measurement is missing")
    return sum(int(u or 0) for u in usage) / users


def _best_bucket(redis: Redis, value_bytes: int) -> int:
    """The users per bucket in BUCKET_RANGE whose string of values wastes least to rounding."""
    probe = "bench:bucket-probe"
    waste = {}
    for users in BUCKET_RANGE:
        redis.set(probe, b"\0" * (users * value_bytes))
        waste[users] = int(redis.memory_usage(probe, samples=0) or 0) / (users * value_bytes)
    redis.delete(probe)
    return min(waste, key=lambda n: (waste[n], -n))


def _slot_bucket_usage(redis: Redis, prefix: str, ids: list[str]) -> tuple[int, float]:
    """(users per bucket, bytes per user) with the values back to back in one string per
    bucket (a reader takes its slot with GETRANGE) and a hash per bucket from user to slot."""
    values = [v if isinstance(v, bytes) else b"" for v in redis.mget([prefix + u for u in ids])]
    size = _best_bucket(redis, len(values[0]))
    keys = []
    for start in range(0, len(ids), size):
        chunk = range(start, min(start + size, len(ids)))
        key = f"{prefix}slots:{start}"
        redis.set(key, b"".join(values[i] for i in chunk))
        redis.hset(f"{key}:index", mapping={ids[i]: i - start for i in chunk})
        keys += [key, f"{key}:index"]
    try:
        return size, _mean_usage(redis, keys, users=len(ids))
    finally:
        redis.delete(*keys)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def ratios(m: dict[str, dict[str, Any]], workers: list[int]) -> dict[str, float | None]:
    def rps(name: str) -> float | None:
        return m[name]["requests_per_s"] if name in m else None

    def items(name: str) -> float | None:
        return m[name]["items_per_s"] if name in m else None

    out = {
        "api_single_vs_minimal_fastapi": ratio(rps("api_single"), rps("minimal_fastapi")),
        "api_single_vs_raw_get": ratio(rps("api_single"), rps("raw_redis_get")),
        "minimal_fastapi_vs_raw_get": ratio(rps("minimal_fastapi"), rps("raw_redis_get")),
        "api_batch_prompts_vs_raw_get": ratio(items("api_batch"), rps("raw_redis_get")),
        "api_batch_prompts_vs_raw_pipeline": ratio(items("api_batch"), items("raw_redis_pipeline")),
        "api_batch_prompts_vs_api_single": ratio(items("api_batch"), rps("api_single")),
        "api_batch_safetensors_prompts_vs_raw_get": ratio(
            items("api_batch_safetensors"), rps("raw_redis_get")
        ),
        "direct_redis_vs_raw_client_get": ratio(rps("direct_redis"), rps("raw_client_get")),
    }
    for n in workers:
        if n != 1:
            for phase in ("minimal_fastapi", "api_single", "api_batch", "api_batch_safetensors"):
                out[f"{phase}_{n}_workers_vs_1"] = ratio(
                    items(f"{phase}_{n}_workers"), items(phase)
                )
    return out


def print_table(result: dict[str, Any]) -> None:
    cfg = result["config"]
    print(
        f"\nServing benchmark: {cfg['users']} users, prompt {cfg['prompt_shape']} "
        f"{cfg['dtype']} ({cfg['value_bytes']} B), {cfg['concurrency']} connections, "
        f"{cfg['seconds']} s per phase, {result['machine']['cpu_count']} CPUs"
    )
    head = f"{'phase':<28}{'req/s':>9}{'prompts/s':>11}{'p50':>8}{'p99':>8}{'p999':>8}{'err':>5}"
    head += f"{'cpu gen/api/redis s':>22}"
    print(head)
    print("-" * len(head))
    for name, m in result["measurements"].items():
        cpu = m["cpu_seconds"]
        cpus = "/".join(
            "-" if cpu.get(k) is None else f"{cpu[k]:.1f}"
            for k in ("load_generator", "api", "redis")
        )
        lat = m["latency_ms"]
        print(
            f"{name:<28}{m['requests_per_s']:>9.0f}{m['items_per_s']:>11.0f}{lat['p50']:>8.2f}"
            f"{lat['p99']:>8.2f}{lat['p999']:>8.2f}{m['errors']:>5}{cpus:>22}"
        )
    print("ratios:", json.dumps(result["ratios"], indent=1))
    for row in result["memory_per_prompt"]:
        buckets = row["slot_bucket_users"]
        candidate = f"; in buckets of {buckets}: {row['slot_buckets_overhead']}x" if buckets else ""
        print(
            f"memory: d={row['width']} {row['dtype']}: {row['memory_usage_bytes']:.0f} B per "
            f"prompt for {row['value_bytes']} B of values ({row['overhead']:.3f}x){candidate}"
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        redis_url, redis_pids = stack.enter_context(
            local_redis(args.redis_url, cluster=args.cluster)
        )
        if args.cluster and not args.broker_url:
            # Celery cannot use a Cluster; the API's client of it needs a plain Redis (never used).
            args.broker_url = stack.enter_context(local_redis())[0]
        redis = connect_redis(redis_url, timeout_s=10, cluster=args.cluster)
        stack.callback(redis.close)
        t0 = time.perf_counter()
        version, value_bytes = seed_prompts(
            Store(redis),
            model=MODEL,
            users=args.users,
            width=WIDTH,
            dtype="float32",
            seed=args.seed,
            activate=True,
        )
        seed_s = time.perf_counter() - t0
        key_prefix = value_key_prefix(MODEL, version)
        last = user_id(args.users - 1)
        if redis.get(key_prefix + last) != Store(redis).get_prompt(MODEL, version, last):
            raise RuntimeError("value_key_prefix() no longer matches app.store's key layout")
        bench = Bench(args, redis_url=redis_url, redis_pids=redis_pids)
        bench.raw_redis(redis, key_prefix)
        bench.direct(version=version, value_bytes=value_bytes)
        logdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pm-bench-api-")))
        for workers in args.api_workers:
            serve(bench, workers=workers, version=version, value_bytes=value_bytes, logdir=logdir)
        memory = memory_per_prompt(redis, users=min(args.users, 1000))
    return {
        "benchmark": "serving",
        "config": {
            "users": args.users,
            "prompt_shape": [1, WIDTH],
            "dtype": "float32",
            "value_bytes": value_bytes,
            "concurrency": args.concurrency,
            "seconds": args.seconds,
            "warmup_seconds": args.warmup,
            "batch_size": args.batch_size,
            "api_workers": args.api_workers,
            "api": "uvicorn app.main:app (PM_ENVIRONMENT=production, --no-access-log)",
            "load_generators": "wrk (HTTP, bench/wrk_prompts.lua), redis-benchmark (Redis)",
            "redis": ("external (--redis-url)" if args.redis_url else "own redis-server")
            + (", Redis Cluster of 3 primaries" if args.cluster else ""),
            "uvloop": importlib.util.find_spec("uvloop") is not None,
            "httptools": importlib.util.find_spec("httptools") is not None,
            "hiredis": importlib.util.find_spec("hiredis") is not None,
            "seed_write_seconds": round(seed_s, 3),
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "note": NOTE,
        "started_at": round(started, 3),
        "measurements": bench.measurements,
        "ratios": ratios(bench.measurements, args.api_workers),
        "memory_per_prompt": memory,
    }


def _worker_counts(text: str) -> list[int]:
    counts = [int(x) for x in text.split(",") if x.strip()]
    if not counts or min(counts) < 1 or counts[0] != 1:
        raise argparse.ArgumentTypeError("a comma-separated list of counts starting with 1")
    return counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16, help="connections")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each phase")
    parser.add_argument("--batch-size", type=int, default=64, help="users per batch request")
    parser.add_argument(
        "--api-workers", type=_worker_counts, default=[1, 2], help="uvicorn --workers, e.g. 1,2"
    )
    parser.add_argument("--redis-url", default=None, help="default: start a redis-server")
    parser.add_argument("--broker-url", default=None, help="the API's Celery broker")
    parser.add_argument(
        "--cluster", action="store_true", help="a Redis Cluster (three local nodes by default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("users", "concurrency", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch_size > args.users:
        parser.error("--batch-size must not exceed --users")
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    exit_on_sigterm()
    main()
