"""C load generators for the serving benchmark: ``wrk`` for HTTP, ``redis-benchmark`` for Redis.

A Python client tops out below the API it drives on a 2-core machine, so its figures describe
the client. Both tools report requests, latency percentiles and errors; each run's own CPU time
comes from ``wait4`` so the benchmark can show that the generator was not the bound.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

LUA_SCRIPT = Path(__file__).with_name("wrk_prompts.lua")
USER_ID_DIGITS = 12  # redis-benchmark's __rand_int__ is 12 digits; the Lua script matches it


def user_id(n: int) -> str:
    return f"u{n:0{USER_ID_DIGITS}d}"


def require(tool: str) -> str:
    """The tool's path, or a SystemExit that says how to install it."""
    path = shutil.which(tool)
    if path is None:
        package = {"redis-benchmark": "redis-tools"}.get(tool, tool)
        raise SystemExit(
            f"{tool} is not installed: `apt-get install {package}` (Debian), "
            "or run `make setup`, which installs it."
        )
    return path


@dataclass(frozen=True)
class Load:
    """What one load-generator run measured."""

    requests: int
    seconds: float
    errors: int
    latency_ms: dict[str, float]  # mean, p50, p99, p999, max
    cpu_seconds: float  # the generator's own user + system time

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def _run(args: list[str]) -> tuple[str, float]:
    """Runs a command to its end: (stdout, its user + system CPU seconds)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} exited with {proc.returncode}:\n{out[-3000:]}")
    return out, usage.ru_utime + usage.ru_stime


def wrk_args(
    base_url: str,
    *,
    mode: str,
    token: str,
    model: str,
    users: int,
    batch: int,
    connections: int,
    seconds: float,
    threads: int = 2,
    delay_ms: float = 0.0,
) -> list[str]:
    """The ``wrk`` command line for bench/wrk_prompts.lua; ``delay_ms`` > 0 paces each connection
    (a request at most every ``delay_ms``, not counted in the latency)."""
    args = [require("wrk"), f"-t{min(threads, connections)}", f"-c{connections}"]
    args += [f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(LUA_SCRIPT), base_url]
    return [*args, "--", mode, token, model, str(users), str(batch), str(delay_ms)]


def wait_handling(pid: int, signum: int, *, timeout_s: float = 30.0) -> None:
    """Until process ``pid`` handles ``signum`` (its ``SigCgt`` in /proc) or has exited. wrk sets
    its SIGINT handler only once its threads run; a SIGINT before that kills it unreported."""
    status = Path(f"/proc/{pid}/status")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
        if (
            fields["State"].split()[0] in ("Z", "X")
            or int(fields["SigCgt"], 16) >> (signum - 1) & 1
        ):
            return
        time.sleep(0.01)
    raise RuntimeError(f"process {pid} did not handle signal {signum} within {timeout_s} s")


def parse_wrk(out: str, *, cpu_seconds: float) -> Load:
    """The Load of wrk's output (the WRK_RESULT line bench/wrk_prompts.lua prints)."""
    match = re.search(r"^WRK_RESULT (\{.*\})$", out, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk printed no result line:\n{out[-3000:]}")
    raw = json.loads(match.group(1))
    lat = raw["latency_us"]
    return Load(
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        errors=sum(raw["errors"].values()),
        latency_ms={k: round(v / 1000, 3) for k, v in lat.items()},
        cpu_seconds=round(cpu_seconds, 2),
    )


def wrk(
    base_url: str,
    *,
    mode: str,
    token: str,
    model: str,
    users: int,
    batch: int,
    connections: int,
    seconds: float,
    threads: int = 2,
    delay_ms: float = 0.0,
) -> Load:
    """``wrk`` against ``base_url`` with bench/wrk_prompts.lua in ``mode`` (single or batch),
    paced by ``delay_ms`` as in ``wrk_args``."""
    args = wrk_args(
        base_url,
        mode=mode,
        token=token,
        model=model,
        users=users,
        batch=batch,
        connections=connections,
        seconds=seconds,
        threads=threads,
        delay_ms=delay_ms,
    )
    out, cpu = _run(args)
    return parse_wrk(out, cpu_seconds=cpu)


def redis_benchmark(
    *,
    host: str,
    port: int,
    db: int,
    key_prefix: str,
    users: int,
    connections: int,
    requests: int,
    pipeline: int = 1,
) -> Load:
    """``redis-benchmark`` GETs of ``key_prefix + user_id(n)`` for random n < ``users``.

    With ``pipeline`` > 1 each request is one pipeline of that many GETs; redis-benchmark counts
    GETs, so ``requests`` here are pipelines, as the API's batch requests are. On a Redis
    Cluster, pass the node that holds the keys' slot (they share one hash tag).
    """
    args = [require("redis-benchmark"), "-h", host, "-p", str(port), "--dbnum", str(db)]
    args += ["-c", str(connections), "-n", str(requests), "-r", str(users), "-P", str(pipeline)]
    args += ["GET", f"{key_prefix}u__rand_int__"]
    out, cpu = _run(args)
    rate = re.search(r"throughput summary: ([\d.]+) requests per second", out)
    summary = re.search(r"avg\s+min\s+p50\s+p95\s+p99\s+max\s*\n\s*([\d.\s]+)\n", out)
    if rate is None or summary is None:
        raise RuntimeError(f"redis-benchmark printed no summary:\n{out[-3000:]}")
    avg, _, p50, _, p99, top = (float(x) for x in summary.group(1).split())
    gets_per_s = float(rate.group(1))
    return Load(
        requests=requests // pipeline,
        seconds=requests / gets_per_s,
        errors=0,  # redis-benchmark exits at the first error reply, and _run raises
        latency_ms={
            "mean": avg,
            "p50": p50,
            "p99": p99,
            "p999": _percentile(out, 99.9),
            "max": top,
        },
        cpu_seconds=round(cpu, 2),
    )


def _percentile(out: str, q: float) -> float:
    """The latency at percentile ``q`` from redis-benchmark's percentile distribution."""
    for pct, ms in re.findall(r"^\s*([\d.]+)% <= ([\d.]+) milliseconds \(cumulative", out, re.M):
        if float(pct) >= q:
            return float(ms)
    raise RuntimeError("redis-benchmark printed no latency distribution")
