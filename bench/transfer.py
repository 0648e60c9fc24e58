"""Bulk export and import of a whole prompt set over HTTP, timed as an operator sees them.

For each population size: a sealed set of ``[1, 640]`` fp32 prompts (Gemma-3-270M's width) is
written through the store, exported by ``GET /models/{name}/versions/{version}/export`` into a
file and imported back by ``POST /models/{name}/import`` (upload, every check, write, read-back
verification, seal), both through the client against ``uvicorn app.main:app`` in a subprocess
and a throwaway redis-server. The imported set must carry the source's digest.

    python -m bench.transfer --users 10000,100000 --out bench/results/transfer.json
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prompt_migration_client import codec
from prompt_migration_client.operator import OperatorClient
from redis import Redis
from safetensors.torch import save as save_tensors

from app.dev.local_redis import LocalRedis, free_port
from app.dev.processes import exit_on_sigterm
from app.store import SetMeta, Store
from bench.serving import production_env
from models.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
MODEL, WIDTH = "gemma-3-270m", 640


def seed_set(store: Store, *, users: int, seed: int = 0, batch: int = 5000) -> str:
    """A sealed, active set of ``users`` random prompts, written as the workers write sets."""
    version = store.allocate_version(MODEL)
    template = get_task("rating").template
    meta = SetMeta(
        model=MODEL,
        version=version,
        task="rating",
        shape=[1, WIDTH],
        template=template.prefix + "<prompt>" + template.suffix,
        lineage={"kind": "bench", "parents": []},
    )
    rng = np.random.default_rng(seed)

    def batches() -> Any:
        for start in range(0, users, batch):
            block = rng.normal(scale=0.05, size=(min(batch, users - start), 1, WIDTH))
            yield [(f"u{start + i}", codec.encode(row, "float32")) for i, row in enumerate(block)]

    head = save_tensors(get_task("rating").make_head(mean_target=3.5).state_dict())
    store.write_complete_set(meta, head=head, batches=batches(), metrics={})
    store.activate(MODEL, version)
    return version


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


class Api:
    """``uvicorn app.main:app`` on a free port, production settings."""

    def __init__(self, redis_url: str, log: Path) -> None:
        self.port, self.token = free_port(), secrets.token_urlsafe(32)
        env = dict(os.environ) | production_env(
            redis_url, broker_url=redis_url, admin=self.token, read=secrets.token_urlsafe(32)
        )
        args = [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=out)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"the API did not start: {log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def measure(api: Api, store: Store, *, users: int, workdir: Path) -> dict[str, Any]:
    version = seed_set(store, users=users)
    source = store.get_meta(MODEL, version)
    client = OperatorClient(api.base, token=api.token, timeout_s=3600)
    client.bundle(MODEL, version)  # the tokenizer's one-off load stays out of the timings
    path = workdir / f"set-{users}.safetensors"
    started = time.perf_counter()
    client.export(MODEL, version, path)
    export_s = time.perf_counter() - started
    started = time.perf_counter()
    done = client.import_file(MODEL, path)
    import_s = time.perf_counter() - started
    assert done["count"] == users and done["digest"] == source.digest, done
    size_mb = path.stat().st_size / 2**20
    path.unlink()
    for old in (version, done["version"]):
        if store.active_pointers().get(MODEL) != old:
            store.delete_set(MODEL, old)
    client.close()
    return {
        "users": users,
        "file_mb": round(size_mb, 1),
        "export_seconds": round(export_s, 2),
        "export_users_per_s": round(users / export_s),
        "export_mb_per_s": round(size_mb / export_s, 1),
        "import_seconds": round(import_s, 2),
        "import_users_per_s": round(users / import_s),
        "import_mb_per_s": round(size_mb / import_s, 1),
        "digest_matches": True,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server).")
    with tempfile.TemporaryDirectory(prefix="pm-bench-transfer-") as tmp:
        workdir = Path(tmp)
        (workdir / "redis").mkdir()
        redis = LocalRedis(binary, workdir / "redis")
        redis.start()
        api = None
        try:
            store = Store(Redis.from_url(redis.url(0)), write_batch=500)
            store.put_model(
                MODEL,
                {
                    "name": MODEL,
                    "checkpoint": MODEL,
                    "hidden_size": WIDTH,
                    "registered_at": time.time(),
                },
            )
            api = Api(redis.url(0), workdir / "api.log")
            rows = [measure(api, store, users=n, workdir=workdir) for n in args.users]
            rss = peak_rss_mb(api.proc.pid)
        finally:
            if api is not None:
                api.stop()
            redis.stop()
    return {
        "benchmark": "transfer",
        "command": "python -m bench.transfer " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "prompt": {"shape": [1, WIDTH], "dtype": "float32"},
        "api_peak_rss_mb": rss,
        "rows": rows,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--users", type=lambda s: [int(n) for n in s.split(",")], default=[10_000, 100_000]
    )
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    for row in result["rows"]:
        print(
            f"{row['users']:>8} users, {row['file_mb']:>7} MB: export {row['export_seconds']} s "
            f"({row['export_users_per_s']}/s), import {row['import_seconds']} s "
            f"({row['import_users_per_s']}/s)"
        )
    print(f"API peak RSS {result['api_peak_rss_mb']} MB")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    exit_on_sigterm()
    main()
