"""Local redis-servers on free ports: for ``make run``, the benchmarks and the tests.

Eviction is off (the store must never lose a key to memory pressure). The tests' and the
benchmarks' servers persist nothing; ``make run``'s keeps an append-only file in its data
directory (``persist=True``), so a restart, or a kill, loses nothing it acknowledged.
Production points ``PM_REDIS_URL`` at a managed Redis instead.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from redis import Redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRedis:
    """``start()`` and ``stop()`` keep the same port, so a restart looks like an outage."""

    def __init__(
        self,
        binary: str,
        workdir: Path,
        *,
        log: Path | None = None,
        extra_args: Sequence[str] = (),
        persist: bool = False,
        own_group: bool = False,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.binary = binary
        self.workdir = workdir
        self.log = log
        self.extra_args = list(extra_args)
        self.persist = persist
        self.own_group = own_group
        self.preexec_fn = preexec_fn
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    def args(self) -> list[str]:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--dir", str(self.workdir), "--loglevel", "warning"]
        # everysec: a killed redis-server loses nothing it acknowledged (the kernel holds the
        # written file); only a crash of the machine loses up to the last second.
        aof = ["yes", "--appendfsync", "everysec"] if self.persist else ["no"]
        return [*args, "--appendonly", *aof, "--maxmemory-policy", "noeviction", *self.extra_args]

    def start(self, *, timeout_s: float = 10.0) -> None:
        """Start and wait until it answers (an append-only file is loaded before that)."""
        with self.log.open("ab") if self.log else open(os.devnull, "wb") as out:
            # In its own process group, a Ctrl-C in the terminal reaches only the supervisor,
            # which stops the store last, after everything that writes to it.
            group = 0 if self.own_group else None
            self.proc = subprocess.Popen(
                self.args(), stdout=out, stderr=out, process_group=group, preexec_fn=self.preexec_fn
            )
        client = Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                client.ping()
                return
            except Exception:
                time.sleep(0.05)
            finally:
                client.close()
        self.stop()
        where = f"; see {self.log}" if self.log else ""
        raise RuntimeError(f"redis-server did not start on port {self.port}{where}")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None


class LocalRedisCluster:
    """A Redis Cluster of ``nodes`` local primaries, every slot assigned, no replicas."""

    SLOT_COUNT = 16384

    def __init__(
        self, binary: str, workdir: Path, *, nodes: int = 3, node_timeout_ms: int = 15000
    ) -> None:
        self.nodes: list[LocalRedis] = []
        # The cluster bus defaults to port + 10000, which a free port near 65535 overflows.
        self.bus_ports = [free_port() for _ in range(nodes)]
        for i, bus_port in enumerate(self.bus_ports):
            node_dir = workdir / f"node-{i}"
            node_dir.mkdir()
            args = ["--cluster-enabled", "yes", "--cluster-port", str(bus_port)]
            args += ["--cluster-node-timeout", str(node_timeout_ms)]
            self.nodes.append(LocalRedis(binary, node_dir, extra_args=args))

    def url(self) -> str:
        """One node's address: cluster clients discover the others from it."""
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    @property
    def pids(self) -> list[int]:
        return [pid for node in self.nodes for pid in node.pids]

    def start(self, *, timeout_s: float = 30.0) -> None:
        try:
            self._start(timeout_s)
        except Exception:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> None:
        for node in self.nodes:
            node.start()
        share = self.SLOT_COUNT // len(self.nodes)
        for i, node in enumerate(self.nodes):
            last = self.SLOT_COUNT - 1 if i == len(self.nodes) - 1 else (i + 1) * share - 1
            with Redis(port=node.port) as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)
        with Redis(port=self.nodes[0].port) as first:
            for node, bus_port in zip(self.nodes[1:], self.bus_ports[1:], strict=True):
                first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, bus_port)
        self.wait_ready(timeout_s=timeout_s)

    def state(self, node: LocalRedis) -> str:
        """``ok`` once the node knows every other node and sees every slot served, else ``fail``."""
        with Redis(port=node.port, decode_responses=True) as client:
            info = client.cluster("INFO")
        known = int(info["cluster_known_nodes"]) == len(self.nodes)
        return str(info["cluster_state"]) if known else "fail"

    def wait_ready(self, *, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(self.state(node) == "ok" for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster's nodes did not agree on their slots")
            time.sleep(0.1)

    def flush(self) -> None:
        for node in self.nodes:
            with Redis(port=node.port) as client:
                client.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
