"""Serving throughput: raw Redis GETs against the API's single-GET and batch reads, in one run.

    python -m bench.serving --out bench/results/serving.json [--users 2000 --concurrency 16
        --seconds 10 --batch-size 64 --api-workers 1 --redis-url URL --cluster]

Starts its own redis-server on a free port (unless ``--redis-url``; with ``--cluster``, a
three-node Redis Cluster, and a plain redis-server for the API's Celery client), writes
``--users`` random prompts of shape ``[1, 640]`` fp32 (Gemma's width) into a sealed, active
prompt set through ``app.store.Store`` (the write path the workers use), starts the real API
(``uvicorn app.main:app`` in a subprocess), then measures, each for ``--seconds`` at
``--concurrency`` concurrent requests from one asyncio client:

1. ``raw_redis_get``: redis-py GETs of the same value keys (the baseline for single reads);
2. ``raw_redis_pipeline``: ``--batch-size`` GETs per pipeline (the baseline for batch reads);
3. ``api_single``: ``GET /users/{id}/prompt`` (raw bytes);
4. ``api_batch``: ``POST /prompts/batch`` with ``--batch-size`` users per request.

Latencies are per request as the client sees them. The client, the API and Redis share this
machine's cores, so the JSON records the CPU seconds each of them used in every phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from app import codec
from app.local_redis import LocalRedis, LocalRedisCluster, free_port
from app.store import SetMeta, Store, _set_prefix, connect_redis, connect_redis_async

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench-serving"
WIDTH = 640  # Gemma-3-270m's hidden size
NOTE = (
    "Client (one asyncio process), API and redis-server run on the same machine and share its "
    "cores; another CPU-heavy job may be running. Throughput is bounded by the CPU each side "
    "gets: see cpu_seconds per phase. Compare ratios within one run, not absolute numbers "
    "across machines."
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
    try:
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
    except OSError:
        return None
    return round(total, 3)


def seed_prompts(store: Store, *, users: int, seed: int) -> tuple[str, list[str], int]:
    """A sealed, active set of ``users`` prompts ``[1, WIDTH]`` fp32; (version, ids, bytes)."""
    store.put_model(MODEL, {"name": MODEL, "checkpoint": MODEL, "registered_at": time.time()})
    version = store.allocate_version(MODEL)
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal((users, 1, WIDTH)) * 0.04).astype(np.float32)
    ids = [f"u{i:07d}" for i in range(users)]
    items = [(u, codec.encode(values[i], "float32")) for i, u in enumerate(ids)]
    store.begin_set(SetMeta(model=MODEL, version=version, task="rating", shape=[1, WIDTH]))
    store.put_head(MODEL, version, b"")
    store.write_prompts(MODEL, version, items)
    store.seal_set(
        MODEL, version, expected_count=len(items), expected_digest=codec.set_digest(items)
    )
    # Not made the default model: a --redis-url run must not change what other readers get.
    store.activate(MODEL, version, make_default=False)
    return version, ids, len(items[0][1])


def value_key(version: str, user: str) -> str:
    # The key layout lives in app.store; run() checks these are the keys it wrote.
    return f"{_set_prefix(MODEL, version)}:u:{user}"


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    items_per_request: int = 1
    cpu: dict[str, float | None] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies) * 1e3
        requests = len(self.latencies)
        rps = requests / self.seconds if self.seconds else 0.0

        def pct(q: float) -> float | None:
            return round(float(np.percentile(lat, q)), 3) if requests else None

        return {
            "requests": requests,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "items_per_request": self.items_per_request,
            "requests_per_s": round(rps, 1),
            "items_per_s": round(rps * self.items_per_request, 1),
            "latency_ms": {
                "mean": round(float(lat.mean()), 3) if requests else None,
                "p50": pct(50),
                "p90": pct(90),
                "p99": pct(99),
                "max": round(float(lat.max()), 3) if requests else None,
            },
            "cpu_seconds": self.cpu,
        }


async def drive(
    phase: Phase,
    request: Callable[[random.Random], Awaitable[bool]],
    *,
    concurrency: int,
    seconds: float,
    warmup_s: float,
    pids: dict[str, list[int]],
) -> Phase:
    """``concurrency`` loops calling ``request`` until the deadline; latency of each call."""

    async def loop(worker: int, until: float, record: bool) -> None:
        rng = random.Random(worker)
        while time.perf_counter() < until:
            start = time.perf_counter()
            try:
                ok = await request(rng)
            except Exception:
                ok = False
            if not record:
                continue
            if ok:
                phase.latencies.append(time.perf_counter() - start)
            else:
                phase.errors += 1

    if warmup_s > 0:
        until = time.perf_counter() + warmup_s
        await asyncio.gather(*(loop(w, until, False) for w in range(concurrency)))
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    before["client"] = time.process_time()
    start = time.perf_counter()
    until = start + seconds
    await asyncio.gather(*(loop(w, until, True) for w in range(concurrency)))
    phase.seconds = time.perf_counter() - start
    after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    after["client"] = time.process_time()
    for name, value in after.items():
        first = before.get(name)
        phase.cpu[name] = None if value is None or first is None else round(value - first, 2)
    return phase


class Api:
    """``uvicorn app.main:app`` as a subprocess, as in production."""

    def __init__(
        self, *, redis_url: str, cluster: bool, broker_url: str, workers: int, log: Path
    ) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.read_token = secrets.token_urlsafe(32)
        env = dict(os.environ)
        env |= {
            "PM_ENVIRONMENT": "production",
            "PM_REDIS_URL": redis_url,
            "PM_REDIS_CLUSTER": str(cluster).lower(),
            "PM_BROKER_URL": broker_url,
            "PM_RESULT_BACKEND": broker_url,
            "PM_ADMIN_TOKEN": secrets.token_urlsafe(32),
            "PM_READ_TOKEN": self.read_token,
            "PYTHONUNBUFFERED": "1",
        }
        args = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1"]
        args += ["--port", str(self.port), "--workers", str(workers), "--log-level", "warning"]
        args += ["--no-access-log"]
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=out)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.read_token}"}

    def wait_ready(self, probe_path: str, *, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the API exited: {self.log.read_text()[-3000:]}")
            try:
                response = httpx.get(self.base + probe_path, headers=self.headers, timeout=5)
                if response.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the API did not answer: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def measure(
    *,
    redis_url: str,
    api: Api,
    version: str,
    ids: list[str],
    value_bytes: int,
    args: argparse.Namespace,
    pids: dict[str, list[int]],
) -> dict[str, Phase]:
    conc, secs, batch = args.concurrency, args.seconds, args.batch_size
    common: dict[str, Any] = dict(concurrency=conc, seconds=secs, warmup_s=args.warmup, pids=pids)
    client = connect_redis_async(redis_url, timeout_s=30, cluster=args.cluster)
    if isinstance(client, AsyncRedisCluster):
        await client.initialize()  # before the burst, as the API's store does before its first
        # read: concurrent first commands would each discover the nodes and race
    keys = [value_key(version, u) for u in ids]
    phases: dict[str, Phase] = {}

    async def raw_get(rng: random.Random) -> bool:
        value = await client.get(rng.choice(keys))
        return value is not None and len(value) == value_bytes

    async def raw_pipeline(rng: random.Random) -> bool:
        pipe = client.pipeline(transaction=False)
        for key in rng.sample(keys, batch):
            pipe.get(key)
        values = await pipe.execute()
        return all(v is not None and len(v) == value_bytes for v in values)

    try:
        phases["raw_redis_get"] = await drive(Phase("raw_redis_get"), raw_get, **common)
        phases["raw_redis_pipeline"] = await drive(
            Phase("raw_redis_pipeline", items_per_request=batch), raw_pipeline, **common
        )
    finally:
        await client.aclose()

    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(
        base_url=api.base, headers=api.headers, limits=limits, timeout=30
    ) as http:
        params = {"model": MODEL}

        async def api_single(rng: random.Random) -> bool:
            response = await http.get(f"/users/{rng.choice(ids)}/prompt", params=params)
            return response.status_code == 200 and len(response.content) == value_bytes

        async def api_batch(rng: random.Random) -> bool:
            body = {"user_ids": rng.sample(ids, batch), "model": MODEL}
            response = await http.post("/prompts/batch", json=body)
            return response.status_code == 200 and len(response.json()["prompts"]) == batch

        phases["api_single"] = await drive(Phase("api_single"), api_single, **common)
        phases["api_batch"] = await drive(
            Phase("api_batch", items_per_request=batch), api_batch, **common
        )
    return phases


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def print_table(result: dict[str, Any]) -> None:
    cfg = result["config"]
    print(
        f"\nServing benchmark: {cfg['users']} users, prompt {cfg['prompt_shape']} "
        f"{cfg['dtype']} ({cfg['value_bytes']} B), concurrency {cfg['concurrency']}, "
        f"{cfg['seconds']} s per phase, {result['machine']['cpu_count']} CPUs, API workers "
        f"{cfg['api_workers']}"
    )
    head = f"{'phase':<20}{'req/s':>10}{'prompts/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
    head += f"{'cpu client/api/redis s':>26}"
    print(head)
    print("-" * len(head))
    for name, m in result["measurements"].items():
        cpu = m["cpu_seconds"]
        cpus = "/".join("-" if cpu.get(k) is None else f"{cpu[k]:.1f}" for k in
                        ("client", "api", "redis"))  # fmt: skip
        lat = m["latency_ms"]
        p50 = "-" if lat["p50"] is None else f"{lat['p50']:.2f}"
        p99 = "-" if lat["p99"] is None else f"{lat['p99']:.2f}"
        print(f"{name:<20}{m['requests_per_s']:>10.0f}{m['items_per_s']:>12.0f}{p50:>9}"
              f"{p99:>9}{m['errors']:>8}{cpus:>26}")  # fmt: skip
    print("ratios:", json.dumps(result["ratios"]))


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.batch_size > args.users:
        raise SystemExit("--batch-size must not exceed --users.")
    started = time.time()
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        redis_url, redis_pids = stack.enter_context(
            local_redis(args.redis_url, cluster=args.cluster)
        )
        # Celery cannot use a Cluster; the API's client of it needs a plain Redis (never used).
        broker_url = stack.enter_context(local_redis())[0] if args.cluster else redis_url
        redis = connect_redis(redis_url, timeout_s=10, cluster=args.cluster)
        store = Store(redis)
        t0 = time.perf_counter()
        version, ids, value_bytes = seed_prompts(store, users=args.users, seed=args.seed)
        seed_s = time.perf_counter() - t0
        if redis.get(value_key(version, ids[-1])) != store.get_prompt(MODEL, version, ids[-1]):
            raise RuntimeError("value_key() no longer matches app.store's key layout")
        redis.close()
        with tempfile.TemporaryDirectory(prefix="pm-bench-api-") as logdir:
            api = Api(
                redis_url=redis_url, cluster=args.cluster, broker_url=broker_url,
                workers=args.api_workers, log=Path(logdir) / "api.log",
            )  # fmt: skip
            try:
                api.wait_ready(f"/users/{ids[0]}/prompt?model={MODEL}")
                pids = {"api": [api.proc.pid], "redis": redis_pids}
                phases = asyncio.run(
                    measure(redis_url=redis_url, api=api, version=version, ids=ids,
                            value_bytes=value_bytes, args=args, pids=pids)
                )  # fmt: skip
            finally:
                api.stop()
    m = {name: phase.summary() for name, phase in phases.items()}
    raw, pipe = m["raw_redis_get"], m["raw_redis_pipeline"]
    single, batch = m["api_single"], m["api_batch"]
    result: dict[str, Any] = {
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
            "client": "one asyncio process: redis.asyncio for Redis, httpx.AsyncClient for the API",
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
        "measurements": m,
        "ratios": {
            "api_single_vs_raw": ratio(single["requests_per_s"], raw["requests_per_s"]),
            "api_batch_vs_raw_pipeline": ratio(batch["items_per_s"], pipe["items_per_s"]),
            "api_batch_vs_raw_get": ratio(batch["items_per_s"], raw["items_per_s"]),
            "api_batch_vs_api_single": ratio(batch["items_per_s"], single["items_per_s"]),
            "api_single_p50_vs_raw_p50": ratio(
                single["latency_ms"]["p50"] or 0.0, raw["latency_ms"]["p50"] or 0.0
            ),
        },
    }
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each phase")
    parser.add_argument("--batch-size", type=int, default=64, help="users per batch request")
    parser.add_argument("--api-workers", type=int, default=1, help="uvicorn --workers")
    parser.add_argument("--redis-url", default=None, help="default: start a redis-server")
    parser.add_argument(
        "--cluster", action="store_true", help="a Redis Cluster (three local nodes by default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("users", "concurrency", "batch_size", "api_workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
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
