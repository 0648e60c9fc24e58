"""How long a promoted migration's set takes to follow a write on its source.

``python -m bench.follow_delay --puts 200 --rate 100 --out bench/results/follow_delay.json``

Fresh processes (a redis-server, ``uvicorn app.main:app``, one solo Celery worker, production
settings), the tiny models: a source set trained, migrated and promoted. Then ``--puts`` PUTs
over HTTP on the source model at ``--rate`` per second (half updates of existing users, half new
users); a poller reads the target set every 2 ms and records, per PUT, the time from sending it
until the target holds the stored adapter's mapping of the new prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from app.config import Settings
from app.store import Store, connect_redis
from bench.serving import local_redis
from bench.upgrade import Service
from models.adapter.model import adapter_from_bytes
from models.migration import map_prompts

SOURCE, TARGET, DATASET = "tiny-llama", "tiny-gemma", "synthetic-tiny"


def _wait(http: httpx.Client, job_id: str, *, timeout_s: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = dict(http.get(f"/migrations/{job_id}").json())
        if record["state"] in (
            "promoted",
            "awaiting_promotion",
            "gate_failed",
            "succeeded",
            "failed",
            "cancelled",
        ):
            return record
        time.sleep(0.5)
    raise RuntimeError(f"job {job_id} did not end")


def _promoted_migration(http: httpx.Client) -> dict[str, Any]:
    for name in (SOURCE, TARGET):
        http.post("/models", json={"name": name}).raise_for_status()
    train = http.post(
        f"/models/{SOURCE}/train", json={"dataset": DATASET, "task": "rating", "epochs": 20}
    )
    train.raise_for_status()
    if _wait(http, train.json()["id"])["state"] != "succeeded":
        raise RuntimeError("training the source set failed")
    body = {
        "sources": [{"model": SOURCE}],
        "target": TARGET,
        "dataset": DATASET,
        "selection": {"strategy": "puma", "budget": 8},
        "adapter": {"epochs": 2, "hidden": 16},
        "auto_promote": False,
    }
    created = http.post("/migrations", json=body)
    created.raise_for_status()
    done = _wait(http, created.json()["id"])
    if done["state"] not in ("awaiting_promotion", "gate_failed"):
        raise RuntimeError(f"the migration ended {done['state']}: {done.get('error')}")
    http.post(f"/migrations/{done['id']}/promote", params={"force": "true"}).raise_for_status()
    return done


def measure(service: Service, store: Store, *, puts: int, rate: float) -> dict[str, Any]:
    http = httpx.Client(
        base_url=service.base, headers={"Authorization": f"Bearer {service.admin}"}, timeout=60
    )
    job = _promoted_migration(http)
    model, version = job["target"]["model"], job["target"]["version"]
    source = store.get_job(job["id"])["sources"][0]
    shape = store.get_meta(source["model"], source["version"]).shape
    adapter = adapter_from_bytes(store.get_blob(job["id"], "adapter") or b"")
    existing = store.set_users(source["model"], source["version"])
    rng = np.random.default_rng(0)
    outstanding: dict[str, tuple[np.ndarray, float]] = {}
    delays: list[float] = []
    lock, sent_all = threading.Lock(), threading.Event()

    def poll() -> None:
        while not (sent_all.is_set() and not outstanding):
            with lock:
                items = list(outstanding.items())
            if items:
                values = store.get_prompts(model, version, [u for u, _ in items])
                now = time.perf_counter()
                for (user, (want, started)), got in zip(items, values, strict=True):
                    if got is not None and np.allclose(np.frombuffer(got, "<f4"), want, atol=1e-5):
                        with lock:
                            if outstanding.get(user, (None, None))[1] == started:
                                del outstanding[user]
                                delays.append(now - started)
            time.sleep(0.002)

    poller = threading.Thread(target=poll)
    poller.start()
    period = 1.0 / rate
    for i in range(puts):
        user = existing[i % len(existing)] if i % 2 else f"follow-new-{i}"
        value = rng.standard_normal(shape).astype("<f4")
        want = map_prompts(adapter, torch.from_numpy(value)[None])[0].numpy().ravel()
        while True:  # one write of a user in flight at a time: its delay is unambiguous
            with lock:
                if user not in outstanding:
                    break
            time.sleep(0.001)
        started = time.perf_counter()
        with lock:
            outstanding[user] = (want, started)
        response = http.put(
            f"/users/{user}/prompt", params={"model": SOURCE}, content=value.tobytes()
        )
        response.raise_for_status()
        time.sleep(max(0.0, started + period - time.perf_counter()))
    sent_all.set()
    poller.join(timeout=60)
    ms = np.array(delays) * 1000
    return {
        "puts": puts,
        "rate_per_s": rate,
        "followed": len(delays),
        "delay_ms": {
            "p50": float(np.percentile(ms, 50)),
            "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)),
            "max": float(ms.max()),
        },
        "within_1s": int((ms <= 1000).sum()),
        "follow_tasks": int(store.counters(job["id"]).get("follow_tasks", 0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--puts", type=int, default=200)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/follow_delay.json"))
    args = parser.parse_args()
    with local_redis() as (url, _), tempfile.TemporaryDirectory(prefix="pm-follow-") as logdir:
        service = Service(url, logdir=Path(logdir))
        try:
            service.wait_ready()
            store = Store(connect_redis(url, timeout_s=10))
            result = measure(service, store, puts=args.puts, rate=args.rate)
        finally:
            service.stop()
    delay = os.environ.get("PM_FOLLOW_DELAY_S", Settings.model_fields["follow_delay_s"].default)
    result["follow_delay_s"] = float(delay)
    result["machine"] = {
        "arch": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
