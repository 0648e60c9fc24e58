"""Read latency while a worker maps a migration's chunks on the same host, per worker priority
and per values in each of the store's MGET/MSET commands.

    python -m bench.read_latency --out bench/results/read-latency.json \\
        [--variants idle:100,idle:500,10:100,10:500 --seconds 12 --repeat 2]

Starts its own redis-server and the API (``uvicorn app.main:app``, one process, production
settings) over a sealed, active set of ``--users`` prompts ``[1, 640]`` fp32. ``wrk`` reads
single prompts paced as ``bench.upgrade`` reads them (4 connections, each at most one read per
10 ms) for ``--seconds``: first with nothing else running; then beside ``PUT /users/{id}/prompt``
at ``--write-rate`` per second (as the upgrade benchmark onboards during its job); then beside
those writes and a process that runs the chunk path as a worker does (``bench.apply``'s source
set of ``--source-users`` users ``[1, 576]``, mapped chunk after chunk into new versions) at each variant's
priority (``idle`` or a niceness, as ``PM_WORKER_PRIORITY``) and values per command
(``app.store.bulk.BULK_VALUES``, set in that process only); and with nothing else again at the
end. The variants are interleaved over ``--repeat`` rounds; each round reports the reads'
p50/p99/p999, the writes' p50/p99 and the users/s the chunk path kept meanwhile. Reads, writes,
the API, Redis and the chunk path share the machine's cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np

from app.config import Settings
from app.store import Store, bulk, connect_redis
from bench import loadgen, write_result
from bench.apply import new_job, recipe_adapter, seed_source
from bench.loadgen import user_id
from bench.serving import Uvicorn, local_redis, production_env, seed_prompts
from models.adapter.model import adapter_to_bytes
from workers import context
from workers.mapping import map_chunk, plan_users
from workers.priority import yield_to_serving

MODEL, WIDTH = "bench-read", 640
Variant = tuple[Literal["idle"] | int, int]  # worker priority, values per MGET/MSET
READ_CONNECTIONS, READ_DELAY_MS = 4, 10.0  # as bench.upgrade paces them


def chunk_path(
    *,
    redis_url: str,
    priority: Literal["idle"] | int,
    bulk_values: int,
    source_users: int,
    seconds: float,
) -> None:
    """Map chunks for ``seconds`` (after a line READY once the source set is written), then print
    the users mapped and the seconds as one JSON line."""
    yield_to_serving(priority)
    bulk.BULK_VALUES = bulk_values
    settings = Settings(environment="test")
    store = Store(connect_redis(redis_url, timeout_s=10), write_batch=settings.write_batch)
    context._store = store  # the workers' stages use this store
    source = seed_source(store, users=source_users, seed=0)
    adapter = adapter_to_bytes(recipe_adapter(0))
    print("READY", flush=True)
    mapped, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        job = new_job(
            store,
            source=source,
            chunk_size=settings.chunk_size,
            adapter=adapter,
            dtype="float32",
            settings=settings,
        )
        plan_users(job, sources=[source])
        for index in range(store.plan_size(job.id)):
            mapped += int(map_chunk(job, index)["users"])
            if time.perf_counter() - started >= seconds:
                break
        store.delete_set(*job.target)
        store.drop_plan(job.id)
    elapsed = time.perf_counter() - started
    store.delete_set(source["model"], source["version"])  # Redis's memory stays as it was
    print(json.dumps({"mapped": mapped, "seconds": elapsed}), flush=True)


@contextlib.contextmanager
def writes(api: Uvicorn, *, admin: str, rate: float) -> Iterator[list[float]]:
    """``PUT /users/{id}/prompt`` of new users at ``rate`` per second on a thread, as the upgrade
    benchmark onboards during its job; yields the list each write's seconds are added to."""
    seconds: list[float] = []
    stop = threading.Event()

    def run() -> None:
        headers = {"Authorization": f"Bearer {admin}", "Content-Type": "application/octet-stream"}
        rng = np.random.default_rng(0)
        with httpx.Client(base_url=api.base, headers=headers, timeout=30) as http:
            next_at, number = time.monotonic(), 0
            while not stop.is_set():
                value = (rng.standard_normal(WIDTH) * 0.04).astype("<f4").tobytes()
                started = time.perf_counter()
                response = http.put(
                    f"/users/w{number}/prompt", params={"model": MODEL}, content=value
                )
                response.raise_for_status()
                seconds.append(time.perf_counter() - started)
                number += 1
                next_at += 1.0 / rate
                stop.wait(max(0.0, next_at - time.monotonic()))

    thread = threading.Thread(target=run, name="bench-writes", daemon=True)
    thread.start()
    try:
        yield seconds
    finally:
        stop.set()
        thread.join(timeout=30)


def write_ms(seconds: list[float]) -> dict[str, Any]:
    p50, p99 = np.percentile(seconds, [50, 99]) * 1000
    return {
        "writes": len(seconds),
        "write_p50": round(float(p50), 3),
        "write_p99": round(float(p99), 3),
    }


def reads(api: Uvicorn, *, token: str, users: int, seconds: float) -> dict[str, Any]:
    load = loadgen.wrk(
        api.base,
        mode="single",
        token=token,
        model=MODEL,
        users=users,
        batch=1,
        connections=READ_CONNECTIONS,
        seconds=seconds,
        delay_ms=READ_DELAY_MS,
    )
    return load.latency_ms | {"requests": load.requests, "errors": load.errors}


def beside_chunk_path(
    api: Uvicorn,
    *,
    redis_url: str,
    token: str,
    admin: str,
    variant: Variant,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One window of reads, beside the writes, while a chunk-path process of ``variant`` runs."""
    priority, bulk_values = variant
    load = [sys.executable, "-m", "bench.read_latency", "--chunk-path", redis_url]
    load += ["--priority", str(priority), "--bulk-values", str(bulk_values)]
    load += ["--source-users", str(args.source_users)]
    load += ["--seconds", str(args.seconds + 3), "--out", os.devnull]
    proc = subprocess.Popen(load, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "READY":
        raise RuntimeError(f"the chunk path process did not start: {proc.wait()}")
    with writes(api, admin=admin, rate=args.write_rate) as written:
        time.sleep(1)  # past its first chunk
        window = reads(api, token=token, users=args.users, seconds=args.seconds)
    out, _ = proc.communicate()
    done = json.loads(out.strip().splitlines()[-1])
    rate = round(done["mapped"] / done["seconds"], 1)
    return window | write_ms(written) | {"chunk_path_users_per_s": rate}


def beside_writes(
    api: Uvicorn, *, token: str, admin: str, args: argparse.Namespace
) -> dict[str, Any]:
    with writes(api, admin=admin, rate=args.write_rate) as written:
        time.sleep(1)
        window = reads(api, token=token, users=args.users, seconds=args.seconds)
    return window | write_ms(written)


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()
    with local_redis(None) as (redis_url, _), tempfile.TemporaryDirectory() as logdir:
        store = Store(connect_redis(redis_url, timeout_s=10))
        _, value_bytes = seed_prompts(
            store,
            model=MODEL,
            users=args.users,
            width=WIDTH,
            dtype="float32",
            seed=0,
            activate=True,
        )
        token, admin = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        env = production_env(redis_url, broker_url=redis_url, admin=admin, read=token)
        api = Uvicorn("app.main:app", env=env, workers=1, log=Path(logdir) / "api.log")
        try:
            probe = f"/users/{user_id(0)}/prompt?model={MODEL}"
            api.wait_ready(probe, headers={"Authorization": f"Bearer {token}"}, size=value_bytes)
            idle_before = reads(api, token=token, users=args.users, seconds=args.seconds)
            with_writes = beside_writes(api, token=token, admin=admin, args=args)
            windows: dict[Variant, list[dict[str, Any]]] = {v: [] for v in args.variants}
            for _ in range(args.repeat):  # interleaved: drift lands on every variant alike
                for variant in args.variants:
                    window = beside_chunk_path(
                        api,
                        redis_url=redis_url,
                        token=token,
                        admin=admin,
                        variant=variant,
                        args=args,
                    )
                    windows[variant].append(window)
                    log(f"{variant[0]}:{variant[1]} {window}")
            idle_after = reads(api, token=token, users=args.users, seconds=args.seconds)
        finally:
            api.stop()
    idle_p99 = statistics.mean([idle_before["p99"], idle_after["p99"]])
    return {
        "benchmark": "read_latency",
        "command": "python -m bench.read_latency " + " ".join(sys.argv[1:]),
        "config": {
            "users": args.users,
            "seconds": args.seconds,
            "repeat": args.repeat,
            "reads": {
                "tool": "wrk, bench/wrk_prompts.lua",
                "connections": READ_CONNECTIONS,
                "delay_ms": READ_DELAY_MS,
            },
            "write_rate_per_s": args.write_rate,
            "chunk_path_source_users": args.source_users,
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "idle": {"before": idle_before, "after": idle_after},
        "writes_alone": with_writes,
        "variants": [
            {
                "priority": priority,
                "bulk_values": bulk_values,
                "rounds": rounds,
                "median_p99": statistics.median(r["p99"] for r in rounds),
                "median_p99_over_idle": round(
                    statistics.median(r["p99"] for r in rounds) / idle_p99, 2
                ),
                "median_chunk_path_users_per_s": statistics.median(
                    r["chunk_path_users_per_s"] for r in rounds
                ),
            }
            for (priority, bulk_values), rounds in windows.items()
        ],
    }


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _priority(text: str) -> Literal["idle"] | int:
    return "idle" if text == "idle" else int(text)


def _variant(text: str) -> Variant:
    priority, _, bulk_values = text.partition(":")
    return _priority(priority), int(bulk_values)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--out", type=Path, required=True)
    add("--users", type=int, default=50_000, help="prompts the reads draw from")
    add("--variants", default="idle:100,idle:500,10:100,10:500", help="PRIORITY:BULK_VALUES,...")
    add("--seconds", type=float, default=12.0, help="each read window")
    add("--repeat", type=int, default=2, help="rounds over the variants")
    add("--source-users", type=int, default=100_000, help="the chunk path's source set")
    add("--write-rate", type=float, default=100.0, help="PUTs per second beside the chunk path")
    add("--chunk-path", metavar="REDIS_URL", help=argparse.SUPPRESS)  # the load process
    add("--priority", default="idle", help=argparse.SUPPRESS)
    add("--bulk-values", type=int, default=bulk.BULK_VALUES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.variants = [_variant(v) for v in args.variants.split(",") if v.strip()]
    except ValueError:
        parser.error("--variants takes PRIORITY:BULK_VALUES pairs, e.g. idle:100,10:500")
    if min(len(args.variants), args.repeat, args.users, args.source_users) < 1:
        parser.error("--variants, --repeat, --users and --source-users need at least one")
    if args.write_rate <= 0:
        parser.error("--write-rate must be positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.chunk_path:
        chunk_path(
            redis_url=args.chunk_path,
            priority=_priority(args.priority),
            bulk_values=args.bulk_values,
            source_users=args.source_users,
            seconds=args.seconds,
        )
        return None
    result = run(args)
    for v in result["variants"]:
        print(
            f"{v['priority']:>5}:{v['bulk_values']:<4} read p99 {v['median_p99']:.2f} ms "
            f"({v['median_p99_over_idle']}x idle), chunk path "
            f"{v['median_chunk_path_users_per_s']:.0f} users/s"
        )
    print(f"idle p99 {result['idle']['before']['p99']} / {result['idle']['after']['p99']} ms")
    print(f"writes alone: read p99 {result['writes_alone']['p99']} ms")
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
