"""A throwaway redis-server on a free port: for ``make run``, the benchmarks and the tests.

Nothing is persisted and eviction is off (the store must never lose a key to memory pressure).
Production points ``PM_REDIS_URL`` at a managed Redis instead.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from redis import Redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRedis:
    """``start()`` and ``stop()`` keep the same port, so a restart looks like an outage."""

    def __init__(
        self, binary: str, workdir: Path, *, log: Path | None = None, extra_args: Sequence[str] = ()
    ) -> None:
        self.binary = binary
        self.workdir = workdir
        self.log = log
        self.extra_args = list(extra_args)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, *, timeout_s: float = 10.0) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.workdir), "--loglevel", "warning"]
        args += ["--maxmemory-policy", "noeviction", *self.extra_args]
        out = self.log.open("ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(args, stdout=out, stderr=out)
        client = Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
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
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None
