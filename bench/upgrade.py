"""The whole upgrade job at production sizes, as an operator runs it, checked against its source.

    python -m bench.upgrade --users 100000,1000000 --out bench/results/upgrade.json

For each size, fresh processes: a redis-server of its own, ``uvicorn app.main:app`` and one
``celery -A workers.celery_app worker -Q gpu,default --pool solo``, in production settings. Then:

1. the source set: the dataset's trained users (a SmolLM2 set trained once through
   ``POST /models/{source}/train`` and cached as an exported set file) plus synthetic users drawn
   around them, written into one set file chunk by chunk and imported through
   ``POST /models/{source}/import?activate=true``;
2. read latency idle: ``wrk`` reading the source's prompts, paced, before any job, once the
   machine is quiet after the import;
3. a budget migration through ``POST /migrations`` (the default recipe), while a thread onboards
   new users and updates existing ones through ``PUT /users/{id}/prompt`` (about 100/s) and
   ``wrk`` keeps reading (with ``--read-window-s``, in windows labelled with the job's stage);
   the job is polled for its stages;
4. peak RSS (VmHWM) of worker, API and redis-server, Redis's used memory, and the check: the new
   set's users against those expected (none lost, none extra) and, on a sample holding every
   user written during the job, each stored value against the job's stored adapter applied to
   the user's latest source prompt.

A job that fails or times out is reported as a run with its state. Nothing holds all prompts in
memory: the set file is written and read in chunks, the check streams the new set's keys.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import httpx
import numpy as np
import torch
from prompt_migration_client.jobs import TERMINAL, JobState
from prompt_migration_client.operator import OperatorClient
from prompt_migration_client.setfile import Entry, header_bytes, open_setfile
from redis import Redis
from redis.cluster import RedisCluster

from app.dev.processes import exit_on_sigterm
from app.jobs.queue import worker_command
from app.store import Store, connect_redis
from app.store.keys import value_key_prefix
from bench import loadgen, write_result
from bench.loadgen import user_id
from bench.serving import Uvicorn, local_redis, production_env
from bench.transfer import peak_rss_mb
from models import assets
from workers import priority

ROOT = Path(__file__).resolve().parents[1]
NOTE = (
    "API, worker, redis-server, wrk and the write thread share the machine's cores. users_per_s "
    "is the job's users over its wall time less the adapter's training seconds; "
    "users_per_s_without_model_work over its wall time less its model steps (select, train, "
    "evaluate: step_seconds, timed by the job itself; step_seconds.item_states is the part of "
    "train and evaluate the frozen models spent computing item states). The worker keeps the "
    "frozen models' item states in one directory for the whole invocation "
    "(item_states_mb_before/after): the first size's jobs compute them, later sizes read them back. "
    "process_cores_*: each process's CPU seconds (/proc/PID/stat) over the wall time, in cores; "
    "bench is this process (the writes and the poller)."
)


@dataclass(frozen=True)
class Recipe:
    """What the job migrates and how the source set is trained (flags)."""

    source: str
    target: str
    dataset: str
    budget: int
    train_users: int | None
    train_epochs: int
    max_train: int
    job_extra: dict[str, Any]

    def migration(self) -> dict[str, Any]:
        body = {
            "sources": [{"model": self.source}],
            "target": self.target,
            "dataset": self.dataset,
            "selection": {"strategy": "puma", "budget": self.budget},
            "max_train_per_user": self.max_train,
        }
        return body | self.job_extra

    def training(self) -> dict[str, Any]:
        body = {
            "dataset": self.dataset,
            "task": "rating",
            "epochs": self.train_epochs,
            "max_train_per_user": self.max_train,
        }
        return body | ({"max_users": self.train_users} if self.train_users else {})


# ---- the processes ---------------------------------------------------------------------------


class Service:
    """API and worker against one redis-server, production settings and strong tokens."""

    def __init__(
        self,
        redis_url: str,
        *,
        logdir: Path,
        broker_url: str | None = None,
        item_state_dir: Path | None = None,
        model_threads: int | None = None,
    ) -> None:
        """``broker_url``: Celery's Redis when the store is a Cluster (Celery cannot use one);
        else database 1 of the store's redis-server. ``item_state_dir``: the worker's kept item
        states (default: the worker's own default). ``model_threads``: the worker's
        ``PM_MODEL_THREADS`` (default: the service's default)."""
        url = urlparse(redis_url)
        broker = broker_url or f"redis://{url.hostname}:{url.port}/1"
        self.admin, self.read = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self.env = production_env(redis_url, broker_url=broker, admin=self.admin, read=self.read)
        self.env |= {
            "PM_REDIS_CLUSTER": str(broker_url is not None).lower(),
            "PYTHONUNBUFFERED": "1",
        }
        if item_state_dir is not None:
            self.env["PM_ITEM_STATE_DIR"] = str(item_state_dir)
        self.worker_log = logdir / "worker.log"
        args = worker_command(node=f"bench-{secrets.token_hex(4)}@%h")
        args += ["--without-gossip", "--without-mingle"]
        with self.worker_log.open("ab") as out:
            threads = {"PM_MODEL_THREADS": str(model_threads)} if model_threads else {}
            self.worker = subprocess.Popen(
                args, cwd=ROOT, env=os.environ | self.env | threads, stdout=out, stderr=out
            )
        self.api = Uvicorn("app.main:app", env=self.env, workers=1, log=logdir / "api.log")
        self.base = self.api.base
        self.client = OperatorClient(self.base, token=self.admin, timeout_s=3600)

    def wait_ready(self, *, timeout_s: float = 180) -> None:
        """Until /readyz answers 200: Redis reachable and the worker answering pings."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in (("API", self.api.proc), ("worker", self.worker)):
                if proc.poll() is not None:
                    raise RuntimeError(f"the {name} exited; see {self.api.log.parent}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base + "/readyz", timeout=5).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"the service did not become ready; see {self.api.log.parent}")

    def stop(self) -> None:
        self.client.close()
        self.api.stop()
        if self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)
            try:
                self.worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def wait_job(client: OperatorClient, job_id: str, *, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        record = client.job(job_id)
        if record["state"] in TERMINAL or time.monotonic() > deadline:
            return record
        time.sleep(1.0)


# ---- the source population -------------------------------------------------------------------


def trained_source(service: Service, recipe: Recipe, *, cache_dir: Path) -> Path:
    """The dataset's trained users as an exported set file: trained once per recipe, cached."""
    doc = [recipe.source, recipe.dataset, recipe.train_users, recipe.train_epochs, recipe.max_train]
    key = hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]
    path = cache_dir / f"upgrade-source-{recipe.source}-{key}.safetensors"
    if path.exists():
        log(f"source set from cache {path}")
        return path
    log(f"training {recipe.source} prompts through the API: {recipe.training()}")
    job = service.client.train(recipe.source, recipe.training())
    done = wait_job(service.client, job["id"], timeout_s=3600)
    if done["state"] != "succeeded":
        raise RuntimeError(f"training the source set ended {done['state']}: {done.get('error')}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    service.client.export(recipe.source, done["target"]["version"], path)
    return path


@dataclass
class Population:
    """The imported users: the trained ones (rows 0..n-1) then ``synthetic`` drawn around them
    (ids ``user_id(k)``, rows n+k); prompts drawn the same way for the job's writes."""

    path: Path
    trained: list[str]
    synthetic: int
    base: np.ndarray  # [n, l, d] the trained users' prompts
    scale: np.ndarray  # [l, d] noise per dimension
    seed: int
    trained_set: set[str] = field(init=False)

    def __post_init__(self) -> None:
        self.trained_set = set(self.trained)

    @property
    def size(self) -> int:
        return len(self.trained) + self.synthetic

    def draw(self, count: int, *, stream: int) -> np.ndarray:
        """``count`` prompts ``[count, l, d]`` fp32: a random trained user's plus noise, the
        same for the same ``stream``."""
        rng = np.random.default_rng([self.seed, stream])
        rows = self.base[rng.integers(len(self.base), size=count)]
        noise = rng.standard_normal(rows.shape, dtype=np.float32) * self.scale
        return (rows + noise).astype(np.float32)

    def source_rows(self, users: list[str]) -> np.ndarray:
        """The imported prompts of ``users`` (ids of this population), read from the file."""
        prompts = open_setfile(self.path).prompts
        row_of = {u: i for i, u in enumerate(self.trained)}
        n = len(self.trained)
        rows = [row_of[u] if u in row_of else n + int(u[1:]) for u in users]
        return np.asarray(prompts[rows], dtype=np.float32)


def write_population(
    source: Path, dest: Path, *, users: int, noise: float, seed: int, chunk: int = 8192
) -> Population:
    """A set file of ``users`` users: the trained set's, then synthetic ones, written chunk by
    chunk (never more than ``chunk`` prompts in memory)."""
    trained_file = open_setfile(source)
    present = trained_file.present()
    base = np.asarray(trained_file.prompts, dtype=np.float32)[present]
    trained = [u for u, keep in zip(trained_file.user_ids(), present, strict=True) if keep]
    if users < len(trained):
        raise SystemExit(f"--users {users} is below the {len(trained)} trained users.")
    scale = base.std(axis=0) * noise
    population = Population(dest, trained, users - len(trained), base, scale, seed)
    if set(trained) & {user_id(0), user_id(population.synthetic)}:
        raise SystemExit("the dataset's user ids collide with the synthetic ones")
    id_width = max(len(user_id(0)), *(len(u) for u in trained))
    head = trained_file.head()
    entries = [
        Entry("prompts", "F32", (users, *base.shape[1:])),
        Entry("present", "U8", (users,)),
        Entry("user_ids", "U8", (users, id_width)),
        *(Entry(f"head.{k}", "F32", tuple(v.shape)) for k, v in head.items()),
    ]
    with dest.open("wb") as out:
        out.write(header_bytes(entries, trained_file.metadata))
        out.write(base.astype("<f4").tobytes())
        for start in range(0, population.synthetic, chunk):
            count = min(chunk, population.synthetic - start)
            out.write(population.draw(count, stream=start).astype("<f4").tobytes())
        out.write(bytes([1]) * users)
        out.write(_padded(trained, id_width))
        for start in range(0, population.synthetic, chunk):
            ids = [user_id(k) for k in range(start, min(start + chunk, population.synthetic))]
            out.write(_padded(ids, id_width))
        for tensor in head.values():
            out.write(np.ascontiguousarray(tensor, dtype="<f4").tobytes())
    open_setfile(dest)  # the header and the data must tile exactly
    return population


def _padded(ids: list[str], width: int) -> bytes:
    return b"".join(u.encode("ascii").ljust(width, b"\0") for u in ids)


# ---- load during the job ---------------------------------------------------------------------


@dataclass
class Writes:
    """Onboarding and updates through the API at ``rate`` per second, on its own thread.

    Only acknowledged writes count; a user's latest value is regenerated from its write number
    (``Population.draw``), so memory stays at one int per user written."""

    service: Service
    population: Population
    model: str
    rate: float
    latest: dict[str, int] = field(default_factory=dict)  # user -> write number
    onboarded: set[str] = field(default_factory=set)
    errors: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    new: int = 0  # new ids tried, past the imported ones

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-writes", daemon=True)
        self._rng = random.Random(self.population.seed)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _pick(self) -> str:
        if self._rng.random() < 0.5:  # a new user, past the imported ids
            self.new += 1
            return user_id(self.population.synthetic + self.new)
        if self._rng.random() < 0.1 or not self.population.synthetic:
            return self._rng.choice(self.population.trained)
        return user_id(self._rng.randrange(self.population.synthetic))

    def _run(self) -> None:
        # The standard library's client: httpx costs about 1.8 ms of CPU per PUT, http.client
        # 0.5, and this thread shares the machine with the job it loads.
        url = urlparse(self.service.base)
        http = HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
        headers = {
            "Authorization": f"Bearer {self.service.admin}",
            "Content-Type": "application/octet-stream",
        }
        try:
            next_at = time.monotonic()
            while not self._stop.is_set():
                self._write(http, headers)
                next_at += 1.0 / self.rate
                self._stop.wait(max(0.0, next_at - time.monotonic()))
        finally:
            http.close()

    def _write(self, http: HTTPConnection, headers: dict[str, str]) -> None:
        user, number = self._pick(), self.population.size + self.sent
        self.sent += 1
        value = self.population.draw(1, stream=number)[0].astype("<f4").tobytes()
        try:
            http.request("PUT", f"/users/{user}/prompt?model={self.model}", value, headers)
            response = http.getresponse()
            body = response.read()
        except (OSError, HTTPException) as error:
            self.errors[type(error).__name__] = self.errors.get(type(error).__name__, 0) + 1
            http.close()  # the next request connects again
            return
        if response.status >= 300:
            key = str(response.status)
            self.errors[key] = self.errors.get(key, 0) + 1
            return
        self.latest[user] = number
        if json.loads(body).get("created"):
            self.onboarded.add(user)


class Reads:
    """``wrk`` reading random imported users' prompts, paced, until stopped (SIGINT makes it
    print its figures)."""

    def __init__(
        self, service: Service, *, model: str, users: int, connections: int, delay_ms: float
    ) -> None:
        args = loadgen.wrk_args(
            service.base,
            mode="single",
            token=service.read,
            model=model,
            users=users,
            batch=1,
            connections=connections,
            seconds=24 * 3600,
            delay_ms=delay_ms,
        )
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def stop(self) -> dict[str, Any]:
        loadgen.wait_handling(self.proc.pid, signal.SIGINT)
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.stdout is not None
        out = self.proc.stdout.read().decode()
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        try:
            load = loadgen.parse_wrk(out, cpu_seconds=usage.ru_utime + usage.ru_stime)
        except RuntimeError as error:  # say how wrk ended: a signal's number is negative
            raise RuntimeError(f"{error}\nwrk's exit code: {self.proc.returncode}") from None
        return {
            "p50": load.latency_ms["p50"],
            "p99": load.latency_ms["p99"],
            "p999": load.latency_ms["p999"],
            "requests": load.requests,
            "requests_per_s": round(load.requests_per_s, 1),
            "errors": load.errors,
        }


class Stoppable(Protocol):
    def stop(self) -> dict[str, Any]: ...


@dataclass
class StageClock:
    """The job stage the poller saw last (``follow`` sets it)."""

    current: str = ""


class ReadWindows:
    """With ``--read-window-s``: successive ``Reads`` of that many seconds until stopped, each
    labelled with the job stage seen at its middle, to find where in the job reads slow down.
    Separate windows' percentiles do not add up to the whole job's, so ``during`` stays empty."""

    def __init__(
        self, start: Callable[[], Stoppable], *, seconds: float, clock: StageClock
    ) -> None:
        self.windows: list[dict[str, Any]] = []
        self._stop = threading.Event()

        def run() -> None:
            while not self._stop.is_set():
                reads = start()
                self._stop.wait(seconds / 2)
                stage = clock.current
                self._stop.wait(seconds / 2)
                self.windows.append({"stage": stage} | reads.stop())

        self._thread = threading.Thread(target=run, name="bench-read-windows", daemon=True)
        self._thread.start()

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join(timeout=60)
        return self.windows


def by_stage(windows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each stage's windows: how many, and the median and the highest of their p99s."""
    p99s: dict[str, list[float]] = {}
    for window in windows:
        p99s.setdefault(window["stage"], []).append(window["p99"])
    return {
        stage: {"windows": len(v), "p99_median": float(np.median(v)), "p99_max": max(v)}
        for stage, v in p99s.items()
    }


def read_window(service: Service, args: argparse.Namespace, population: Population) -> Reads:
    return Reads(
        service,
        model=args.source,
        users=max(1, population.synthetic),
        connections=args.read_connections,
        delay_ms=args.read_delay_ms,
    )


# ---- the job ---------------------------------------------------------------------------------


def follow(
    client: OperatorClient,
    job_id: str,
    *,
    timeout_s: float,
    clock: StageClock,
    pids: dict[str, list[int]],
) -> tuple[dict[str, Any], dict[str, float], dict[str, CpuUse], bool]:
    """Poll the job to its end (``clock`` follows its stage): (last record, seconds per stage
    seen, the CPU used in each stage by the machine and by each of ``pids``' processes, timed
    out)."""
    stages: dict[str, float] = {}
    cpu: dict[str, CpuUse] = {}
    current, since, cpu_since = "", time.monotonic(), CpuUse.now(pids)
    record: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s

    def close_stage() -> None:
        stages[current] = round(stages.get(current, 0.0) + time.monotonic() - since, 2)
        used = CpuUse.now(pids) - cpu_since
        cpu[current] = cpu[current] + used if current in cpu else used

    while time.monotonic() < deadline:
        try:
            record = client.job(job_id)
        except httpx.HTTPError as error:
            log(f"  polling: {error!r}")
            time.sleep(1.0)
            continue
        if record["stage"] != current:
            if current:
                close_stage()
            log(
                f"  [{record['state']}] {record['stage']} "
                f"users mapped {record['progress'].get('users_mapped')}"
            )
            current, since, cpu_since = record["stage"], time.monotonic(), CpuUse.now(pids)
            clock.current = current
        if record["state"] in TERMINAL:
            return record, stages, cpu, False
        time.sleep(0.5)
    if current:
        close_stage()
    return record, stages, cpu, True


def job_wall(record: dict[str, Any]) -> float:
    """The job's wall seconds, from the record's own clock."""
    return float(record["updated_at"]) - float(record["created_at"])


# The job's steps whose time follows the frozen models and the budget or the test sample, not
# the number of users (the job's own timers, JobRun.timed).
MODEL_STEPS = ("select", "train", "fit", "evaluate")


def users_per_s(record: dict[str, Any], *, left_out_s: float, planned: int) -> float | None:
    """Users mapped per second of the job's wall time less ``left_out_s``; None unless it ended."""
    if record.get("state") not in TERMINAL:
        return None
    mapped = int((record.get("progress") or {}).get("users_mapped") or 0) or planned
    return round(mapped / max(1e-9, job_wall(record) - left_out_s), 1)


# ---- the check -------------------------------------------------------------------------------


def expected_user(user: str, population: Population, onboarded: set[str]) -> bool:
    if user in onboarded:
        return True
    if user.startswith("u") and len(user) == len(user_id(0)) and user[1:].isdigit():
        return int(user[1:]) < population.synthetic
    return user in population.trained_set


def check(
    store: Store,
    record: dict[str, Any],
    population: Population,
    writes: Writes,
    *,
    sample: int,
    atol: float,
) -> dict[str, Any]:
    """The new set against the source: every key scanned for lost and extra users; on a sample
    holding every user written during the job, each value against the stored adapter applied to
    the user's latest source prompt (lost, stale). The expected values come from the adapter's
    own forward pass, not the folded form the job maps through, so the check covers the fold."""
    from models.adapter.model import adapter_from_bytes

    target, version = record["target"]["model"], record["target"]["version"]
    count = extra = 0
    for key in store.redis.scan_iter(match=f"{value_key_prefix(target, version)}*", count=5000):
        count += 1
        user = (key.decode() if isinstance(key, bytes) else key).rsplit(":", 1)[-1]
        extra += not expected_user(user, population, writes.onboarded)
    expected = population.size + len(writes.onboarded)
    out: dict[str, Any] = {
        "count": count,
        "expected": expected,
        "extra": extra,
        "lost": expected - (count - extra),
    }
    users = _sample(population, writes, size=sample)
    blob = store.get_blob(record["id"], "adapter")
    out |= {"sampled": len(users), "written_during_job": len(writes.latest)}
    if blob is None:
        return out | {"stale": None, "lost_in_sample": None, "note": "the job stored no adapter"}
    adapter = adapter_from_bytes(blob).eval()
    # Users written during the job apart: the windows the job must follow are theirs.
    tally = {"written": {"lost": 0, "stale": 0}, "imported": {"lost": 0, "stale": 0}}
    worst = 0.0
    for start in range(0, len(users), 4096):
        block = users[start : start + 4096]
        with torch.inference_mode():
            want = adapter(torch.from_numpy(_latest(block, population, writes))).numpy()
        got = store.get_prompts(target, version, block)
        for user, value, expect in zip(block, got, want, strict=True):
            counts = tally["written" if user in writes.latest else "imported"]
            if value is None:
                counts["lost"] += 1
                continue
            diff = float(np.abs(np.frombuffer(value, "<f4").reshape(expect.shape) - expect).max())
            worst = max(worst, diff)
            counts["stale"] += diff > atol * (1 + float(np.abs(expect).max()))
    stale = tally["written"]["stale"] + tally["imported"]["stale"]
    lost = tally["written"]["lost"] + tally["imported"]["lost"]
    return out | {"stale": stale, "lost_in_sample": lost, "by_origin": tally, "max_abs_diff": worst}


def _sample(population: Population, writes: Writes, *, size: int) -> list[str]:
    """Every user written during the job, and ``size`` imported users drawn at random."""
    n = len(population.trained)
    picked = random.Random(population.seed + 1).sample(
        range(population.size), min(size, population.size)
    )
    chosen = {population.trained[k] if k < n else user_id(k - n) for k in picked}
    return sorted(chosen | set(writes.latest))


def _latest(users: list[str], population: Population, writes: Writes) -> np.ndarray:
    """Each user's latest acknowledged source prompt: the job-time write, else the import."""
    imported = [u for u in users if u not in writes.latest]
    rows = dict(zip(imported, population.source_rows(imported), strict=True)) if imported else {}
    for user in users:
        if user in writes.latest:
            rows[user] = population.draw(1, stream=writes.latest[user])[0]
    return np.stack([rows[u] for u in users]).astype(np.float32)


# ---- one run ---------------------------------------------------------------------------------


def redis_memory_mb(redis: Redis | RedisCluster) -> dict[str, Any]:
    """Used and peak memory; for a Cluster, summed over its primaries and listed per node."""
    if not isinstance(redis, RedisCluster):
        info = redis.info("memory")
        return {
            "used": round(int(info["used_memory"]) / 2**20, 1),
            "peak": round(int(info["used_memory_peak"]) / 2**20, 1),
        }
    nodes = [redis.info("memory", target_nodes=node) for node in redis.get_primaries()]
    used = [round(int(i["used_memory"]) / 2**20, 1) for i in nodes]
    peak = [round(int(i["used_memory_peak"]) / 2**20, 1) for i in nodes]
    return {
        "used": round(sum(used), 1),
        "peak": round(sum(peak), 1),
        "used_per_node": used,
        "peak_per_node": peak,
    }


def measure(args: argparse.Namespace, recipe: Recipe, users: int) -> dict[str, Any]:
    """One size end to end; any failure is recorded in the run, never raised."""
    run: dict[str, Any] = {
        "users": users,
        "state": None,
        "stage_seconds": {},
        "users_per_s": None,
        "peak_rss_mb": {},
        "redis_used_mb": None,
        "read_ms": {"idle": None, "during": None},
        "check": {"lost": None, "stale": None, "extra": None, "sampled": 0},
    }
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pm-bench-up-")))
        redis_url, redis_pids = stack.enter_context(local_redis(cluster=args.cluster))
        broker_url, broker_pids = stack.enter_context(local_redis()) if args.cluster else (None, [])
        service = Service(
            redis_url,
            logdir=workdir,
            broker_url=broker_url,
            item_state_dir=args.item_states,
            model_threads=args.model_threads,
        )
        stack.callback(service.stop)
        run["item_states_mb_before"] = directory_mb(args.item_states)
        redis = connect_redis(redis_url, timeout_s=30, cluster=args.cluster)
        stack.callback(redis.close)
        run["loadavg_before"] = [round(x, 2) for x in os.getloadavg()]
        try:
            steps(
                args,
                recipe,
                users=users,
                service=service,
                redis=redis,
                redis_pids=redis_pids + broker_pids,
                run=run,
                workdir=workdir,
            )
        except Exception as error:  # a failed run is a result
            traceback.print_exc()
            run["error"] = f"{type(error).__name__}: {error}"
            run["state"] = run["state"] or "error"
        run["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        run["item_states_mb_after"] = directory_mb(args.item_states)
        pids = {"worker": service.worker.pid, "api": service.api.proc.pid}
        run["peak_rss_mb"] = {name: peak_rss_mb(pid) for name, pid in pids.items()}
        nodes = [peak_rss_mb(pid) for pid in redis_pids]
        run["peak_rss_mb"]["redis"] = max((m for m in nodes if m is not None), default=None)
        if args.cluster:
            run["peak_rss_mb"]["redis_per_node"] = nodes
            run["peak_rss_mb"]["broker_redis"] = peak_rss_mb(broker_pids[0])
        with contextlib.suppress(Exception):
            memory = redis_memory_mb(redis)
            run["redis_used_mb"], run["redis_peak_used_mb"] = memory["used"], memory["peak"]
            if args.cluster:
                run["redis_used_mb_per_node"] = memory["used_per_node"]
        if run.get("error"):
            run["logs_tail"] = {
                "worker": service.worker_log.read_text(errors="replace")[-2000:],
                "api": service.api.log.read_text(errors="replace")[-2000:],
            }
    return run


# The columns of /proc/stat's cpu line, in order (man 5 proc).
CPU_COLUMNS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_times() -> np.ndarray:
    """The machine's CPU ticks so far, by ``CPU_COLUMNS``."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1 : 1 + len(CPU_COLUMNS)]
    return np.array([int(f) for f in fields], dtype=np.int64)


def cpu_percent(ticks: np.ndarray) -> dict[str, float]:
    """Where CPU ticks spent (a difference of two ``cpu_times``) went, in percent: a job slowed
    by something outside it shows as steal (the hypervisor) or iowait."""
    total = max(1, int(ticks.sum()))
    return {
        name: round(100 * int(t) / total, 1) for name, t in zip(CPU_COLUMNS, ticks, strict=True)
    }


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user and system, every thread) process ``pid`` has used so far; 0 once it is
    gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


@dataclass(frozen=True)
class CpuUse:
    """CPU used: the machine's ticks by ``CPU_COLUMNS``, and each named group of processes'
    seconds. Two readings' difference is what was used between them."""

    machine: np.ndarray
    processes: dict[str, float]

    @classmethod
    def now(cls, pids: dict[str, list[int]]) -> CpuUse:
        processes = {name: sum(process_cpu_s(pid) for pid in group) for name, group in pids.items()}
        return cls(cpu_times(), processes)

    def __sub__(self, other: CpuUse) -> CpuUse:
        processes = {k: v - other.processes.get(k, 0.0) for k, v in self.processes.items()}
        return CpuUse(self.machine - other.machine, processes)

    def __add__(self, other: CpuUse) -> CpuUse:
        processes = {k: v + other.processes.get(k, 0.0) for k, v in self.processes.items()}
        return CpuUse(self.machine + other.machine, processes)

    def cores(self, seconds: float) -> dict[str, float]:
        """Each group's CPU over ``seconds`` of wall time, in cores."""
        return {k: round(v / max(seconds, 1e-9), 2) for k, v in self.processes.items()}


# The idle reads wait for a second in which the machine's cores are busy less than this: what an
# import leaves running (its buffers freed, Redis's lazy frees) is not idle.
QUIET_BUSY = 0.10


def wait_quiet(*, busy_below: float, timeout_s: float) -> dict[str, float]:
    """Until a second in which the machine's cores were busy less than ``busy_below`` (a
    fraction), or ``timeout_s``: the wait, and the last second's busy fraction."""
    started = time.monotonic()
    while True:
        before = cpu_times()
        time.sleep(1.0)
        shares = cpu_percent(cpu_times() - before)
        busy = 1.0 - (shares["idle"] + shares["iowait"]) / 100
        waited = time.monotonic() - started
        if busy < busy_below or waited > timeout_s:
            return {"seconds": round(waited, 1), "busy": round(busy, 3)}


def directory_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


def steps(
    args: argparse.Namespace,
    recipe: Recipe,
    *,
    users: int,
    service: Service,
    redis: Redis | RedisCluster,
    redis_pids: list[int],
    run: dict[str, Any],
    workdir: Path,
) -> None:
    service.wait_ready()
    for name in (recipe.source, recipe.target):
        service.client.register_model(name)
    source = trained_source(service, recipe, cache_dir=args.cache_dir)
    started = time.perf_counter()
    population = write_population(
        source, workdir / "population.safetensors", users=users, noise=args.noise, seed=args.seed
    )
    run["file_write_seconds"] = round(time.perf_counter() - started, 2)
    log(
        f"{users} users ({len(population.trained)} trained) written in "
        f"{run['file_write_seconds']} s; importing"
    )
    started = time.perf_counter()
    imported = service.client.import_file(recipe.source, population.path, activate=True)
    run["import_seconds"] = round(time.perf_counter() - started, 2)
    run["import_users_per_s"] = round(users / run["import_seconds"], 1)
    run["import_rss_mb"] = {"api": peak_rss_mb(service.api.proc.pid)}
    assert imported["count"] == users, imported
    pids = {
        "worker": [service.worker.pid],
        "api": [service.api.proc.pid],
        "redis": redis_pids,
        "bench": [os.getpid()],  # the writes' thread and the poller
    }
    if args.read_connections:
        run["quiet_before_idle"] = wait_quiet(busy_below=QUIET_BUSY, timeout_s=args.quiet_timeout_s)
        idle = read_window(service, args, population)
        idle_pids = pids | {"wrk": [idle.proc.pid]}
        cpu_before, idle_from = CpuUse.now(idle_pids), time.monotonic()
        time.sleep(args.idle_seconds)
        idle_cpu, idle_s = CpuUse.now(idle_pids) - cpu_before, time.monotonic() - idle_from
        run["read_ms"]["idle"] = idle.stop()
        run["process_cores_idle"] = idle_cpu.cores(idle_s)
    writes = Writes(service, population, recipe.source, args.write_rate)
    job = service.client.migrate(recipe.migration())
    run["job_id"] = job["id"]
    clock = StageClock()
    reads: Reads | ReadWindows | None = None
    if args.read_connections and args.read_window_s:
        reads = ReadWindows(
            lambda: read_window(service, args, population), seconds=args.read_window_s, clock=clock
        )
    elif args.read_connections:
        reads = read_window(service, args, population)
    writes.start()
    pids |= {"wrk": [reads.proc.pid]} if isinstance(reads, Reads) else {}
    cpu_before, polled_from = CpuUse.now(pids), time.monotonic()
    try:
        record, stages, stage_cpu, timed_out = follow(
            service.client, job["id"], timeout_s=args.timeout_s, clock=clock, pids=pids
        )
        # Read before the reads stop: wrk's process is gone after.
        during, polled_s = CpuUse.now(pids) - cpu_before, time.monotonic() - polled_from
    finally:
        writes.stop()
        if isinstance(reads, ReadWindows):
            windows = reads.stop()
            run["read_ms"] |= {"during_windows": windows, "during_by_stage": by_stage(windows)}
        elif reads is not None:
            run["read_ms"]["during"] = reads.stop()
    run["machine_cpu_during_job"] = cpu_percent(during.machine)
    run["machine_cpu_by_stage"] = {
        stage: cpu_percent(use.machine) for stage, use in stage_cpu.items()
    }
    run["process_cores_during_job"] = during.cores(polled_s)
    run["process_cores_by_stage"] = {
        stage: use.cores(stages[stage]) for stage, use in stage_cpu.items()
    }
    run["state"] = record.get("state", "unknown") if not timed_out else "timed_out"
    run["job_state_at_end"] = record.get("state")
    run["stage_seconds"] = record.get("stage_seconds") or stages
    cost = record.get("cost") or {}
    run["job_seconds"] = round(job_wall(record), 2) if record.get("state") in TERMINAL else None
    run["users_per_s"] = users_per_s(
        record, left_out_s=float(cost.get("train_seconds") or 0), planned=users
    )
    run["step_seconds"] = step_seconds = cost.get("step_seconds") or {}
    model_seconds = sum(step_seconds.get(step, 0.0) for step in MODEL_STEPS)
    run["users_per_s_without_model_work"] = (
        users_per_s(record, left_out_s=model_seconds, planned=users) if step_seconds else None
    )
    run["job"] = {
        k: record.get(k)
        for k in (
            "stage",
            "progress",
            "cost",
            "gate",
            "error",
            "promotion_refused",
            "target",
            "sample",
        )
    }
    run["writes"] = {
        "sent": writes.sent,
        "acknowledged_users": len(writes.latest),
        "onboarded": len(writes.onboarded),
        "errors": writes.errors,
        "rate_per_s": args.write_rate,
    }
    if timed_out:
        with contextlib.suppress(Exception):
            service.client.cancel(job["id"])
    elif record.get("state") == JobState.gate_failed and args.force_promote:
        # What an operator does when the gate fails by noise against a barely trained source:
        # promote with force; the set has followed the sources' writes all along.
        started = time.perf_counter()
        record = service.client.promote(job["id"], force=True)
        run["forced_promotion"] = {
            "seconds": round(time.perf_counter() - started, 2),
            "state": record.get("state"),
        }
        run["state"] = f"{record.get('state')} (forced after gate_failed)"
    # Writes acknowledged just before the job ended reach the new set by a follow task.
    time.sleep(args.settle_seconds)
    store = Store(redis)
    run["job_counters"] = store.counters(job["id"])
    run["chunks"] = len(store.chunks_done(job["id"]))
    log(f"checking the new set ({args.sample} sampled + every user written during the job)")
    run["check"] = check(store, record, population, writes, sample=args.sample, atol=args.atol)


# ---- output ----------------------------------------------------------------------------------


def print_run(run: dict[str, Any]) -> None:
    reads = run["read_ms"]

    def lat(which: str) -> str:
        r = reads.get(which)
        return "-" if not r else f"p50 {r['p50']} / p99 {r['p99']} ms"

    print(
        f"\n{run['users']} users: {run['state']}"
        + (f" ({run['error']})" if run.get("error") else "")
    )
    print(f"  stages (s): {run['stage_seconds']}")
    print(
        f"  job {run.get('job_seconds')} s, {run['users_per_s']} users/s without adapter training, "
        f"{run.get('users_per_s_without_model_work')} without model work"
    )
    print(f"  steps (s): {run.get('step_seconds')}")
    print(f"  machine CPU % during the job: {run.get('machine_cpu_during_job')}")
    print(f"  cores used during the job: {run.get('process_cores_during_job')}")
    print(f"  peak RSS MB: {run['peak_rss_mb']}; Redis used {run['redis_used_mb']} MB")
    print(f"  reads idle {lat('idle')}, during {lat('during')}")
    if "quiet_before_idle" in run:
        print(
            f"    idle after waiting {run['quiet_before_idle']} for a quiet machine; cores "
            f"used idle: {run.get('process_cores_idle')}"
        )
    for stage, seen in reads.get("during_by_stage", {}).items():
        print(f"    {stage}: {seen}")
    print(f"  check: {run['check']}")


def _user_counts(text: str) -> list[int]:
    counts = [int(x) for x in text.split(",") if x.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of user counts")
    return counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add(
        "--users",
        type=_user_counts,
        default=[100_000, 1_000_000],
        help="sizes, e.g. 100000,1000000",
    )
    add("--out", type=Path, required=True)
    add("--source", default="smollm2-135m")
    add("--target", default="gemma-3-270m")
    add("--dataset", default="movielens-100k")
    add("--budget", type=int, default=20, help="users the adapter trains on (puma)")
    add("--train-users", type=int, default=60, help="source users trained (0: all)")
    add("--train-epochs", type=int, default=2)
    add("--max-train", type=int, default=10, help="training interactions per user")
    add("--job-extra", type=json.loads, default={}, help="JSON merged into POST /migrations")
    add("--noise", type=float, default=0.5, help="synthetic noise, in per-dimension std")
    add("--write-rate", type=float, default=100.0, help="PUTs per second during the job")
    add("--read-connections", type=int, default=4, help="wrk connections (0: no reads)")
    add("--read-delay-ms", type=float, default=10.0, help="pause per connection per read")
    add(
        "--idle-seconds",
        type=float,
        default=30.0,
        help="idle read window before the job, once the machine is quiet",
    )
    add(
        "--quiet-timeout-s",
        type=float,
        default=120.0,
        help="longest wait for a quiet machine before the idle window (a host never quiet)",
    )
    add(
        "--read-window-s",
        type=float,
        default=0.0,
        help="read during the job in windows of this many seconds, each labelled with the job's "
        "stage, instead of one window for the whole job (0)",
    )
    add("--sample", type=int, default=1000, help="users checked by value, besides those written")
    add("--atol", type=float, default=1e-5, help="value tolerance of the check")
    add(
        "--settle-seconds",
        type=float,
        default=2.0,
        help="wait after the job and the writes end, before the check (follow delay)",
    )
    add("--timeout-s", type=float, default=3 * 3600, help="per job")
    add(
        "--cluster",
        action="store_true",
        help="the store on a three-node Redis Cluster, Celery on a plain redis-server",
    )
    add(
        "--no-force-promote",
        dest="force_promote",
        action="store_false",
        help="leave a job whose gate failed unpromoted (default: promote it with force)",
    )
    add("--seed", type=int, default=0)
    add(
        "--model-threads",
        type=int,
        default=None,
        help="the worker's PM_MODEL_THREADS, torch threads of the model stages (default: the "
        "service's, its cores less one)",
    )
    add(
        "--item-states",
        type=Path,
        default=None,
        help="the worker's kept item states (default: a new directory for this run, shared by "
        "its sizes, as one deployment's would be)",
    )
    add(
        "--cache-dir",
        type=Path,
        default=assets.cache_dir() / "bench",
        help="where the trained source set is cached",
    )
    args = parser.parse_args(argv)
    if args.write_rate <= 0:
        parser.error("--write-rate must be positive")
    if args.model_threads is not None and args.model_threads < 1:
        parser.error("--model-threads must be at least 1")
    if args.read_window_s < 0:
        parser.error("--read-window-s must be 0 (one window) or positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.read_connections:
        loadgen.require("wrk")
    recipe = Recipe(
        args.source,
        args.target,
        args.dataset,
        args.budget,
        args.train_users or None,
        args.train_epochs,
        args.max_train,
        args.job_extra,
    )
    load_before = os.getloadavg()
    started = time.time()
    runs = []
    with contextlib.ExitStack() as stack:
        if args.item_states is None:  # one deployment's: the first job computes, later ones read
            made = tempfile.TemporaryDirectory(prefix="pm-bench-item-states-")
            args.item_states = Path(stack.enter_context(made))
        for users in args.users:
            log(f"== {users} users")
            runs.append(measure(args, recipe, users))
            print_run(runs[-1])
    result = {
        "benchmark": "upgrade",
        "command": "python -m bench.upgrade " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {
            "recipe": recipe.migration(),
            "source_training": recipe.training(),
            "noise_std": args.noise,
            "write_rate_per_s": args.write_rate,
            "reads": {
                "tool": "wrk, bench/wrk_prompts.lua",
                "connections": args.read_connections,
                "delay_ms": args.read_delay_ms,
                "idle_seconds": args.idle_seconds,
                "window_seconds": args.read_window_s or None,
            },
            "sample": args.sample,
            "atol": args.atol,
            "settle_seconds": args.settle_seconds,
            "force_promote_on_gate_failure": args.force_promote,
            "store": "Redis Cluster, 3 primaries" if args.cluster else "one redis-server",
            "model_threads": priority.model_threads(args.model_threads),
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "note": NOTE,
        "started_at": round(started, 3),
        "runs": runs,
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    exit_on_sigterm()
    main()
