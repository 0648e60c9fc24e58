"""A small process supervisor for ``make run``: children that die are started again.

Each child is a name and a function that starts it. A thread polls the children; one that exits
while the supervisor is not stopping is logged with its exit status and started again after a
backoff that doubles with each quick death (a child that ran ``stable_s`` starts over at the
first step). A child that keeps dying at once is a configuration error, not a fault: after
``max_failures`` quick deaths in a row the supervisor gives up and says so. ``stop()`` ends the
children in the reverse order of their start, so the store goes last.

The children are recorded in ``run_dir/children`` (see ``app.dev.processes``): a start in the same
run directory first stops what a supervisor that died left running (``stop_leftovers()``).
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.dev.processes import Tracked, record, stop_leftovers

Spawn = Callable[[], subprocess.Popen[bytes]]


@dataclass
class Child:
    name: str
    spawn: Spawn
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    quick_deaths: int = 0
    restarts: int = 0
    restart_at: float | None = None


def describe_exit(returncode: int) -> str:
    """``exit status 1`` or ``killed by SIGKILL``, as an operator reads it."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


class Supervisor:
    def __init__(
        self,
        run_dir: Path,
        *,
        say: Callable[[str], None] = print,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        stable_s: float = 60.0,
        max_failures: int = 6,
    ) -> None:
        self.run_dir = run_dir
        self.say = say
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.stable_s, self.max_failures = stable_s, max_failures
        self.children: list[Child] = []
        self.failed: str | None = None  # why the supervisor gave up, once it has
        self.records = run_dir / "children"
        self._stopping = threading.Event()
        self._checking = threading.Lock()  # held by a check; stop() waits for it to end

    def stop_leftovers(self) -> None:
        """Stop the children a dead supervisor of this run directory left running."""
        stop_leftovers(self.records, say=self.say)

    def start(self, name: str, spawn: Spawn) -> subprocess.Popen[bytes]:
        """Start a child now (the caller's thread: start-up errors reach the caller)."""
        child = Child(name, spawn)
        self.children.append(child)
        self._launch(child)
        assert child.proc is not None
        return child.proc

    def pid(self, name: str) -> int | None:
        child = next((c for c in self.children if c.name == name), None)
        return child.proc.pid if child is not None and child.proc is not None else None

    def watch(self, *, interval_s: float = 0.2) -> None:
        """Poll the children from a thread until ``stop()``. The thread never ends: it starts
        children again, and a child's death signal fires when the thread that started it ends."""

        def loop() -> None:
            while not self._stopping.wait(interval_s):
                with self._checking:
                    self.check()
            threading.Event().wait()  # ending would signal its children before stop() ends them

        threading.Thread(target=loop, name="supervisor", daemon=True).start()

    def check(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if self._stopping.is_set() or self.failed:
                return
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._restart(child)
            elif child.proc is not None and child.proc.poll() is not None:
                self._died(child, now)

    def _died(self, child: Child, now: float) -> None:
        assert child.proc is not None
        ran = now - child.started
        child.quick_deaths = 1 if ran >= self.stable_s else child.quick_deaths + 1
        status = describe_exit(child.proc.returncode)
        if child.quick_deaths > self.max_failures:
            self.failed = (
                f"{child.name} exited ({status}) {child.quick_deaths} times in a row, each "
                f"within {self.stable_s:.0f} s of its start; see {self.log_path(child.name)}"
            )
            self.say(f"[supervisor] {self.failed}; giving up")
            return
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (child.quick_deaths - 1))
        child.restart_at = now + delay
        self.say(
            f"[supervisor] {child.name} (pid {child.proc.pid}) exited ({status}) after "
            f"{ran:.1f} s; restarting it in {delay:.1f} s"
        )

    def _restart(self, child: Child) -> None:
        child.restart_at = None
        try:
            self._launch(child)
        except Exception as error:  # a failed start is one more quick death
            self.say(f"[supervisor] {child.name} did not start: {error}")
            child.started = time.monotonic()
            child.quick_deaths += 1
            child.restart_at = time.monotonic() + min(
                self.max_backoff_s, self.backoff_s * 2 ** (child.quick_deaths - 1)
            )
            return
        child.restarts += 1
        assert child.proc is not None
        self.say(f"[supervisor] {child.name} restarted (pid {child.proc.pid})")

    def _launch(self, child: Child) -> None:
        child.proc = child.spawn()
        child.started = time.monotonic()
        (self.run_dir / f"{child.name}.pid").write_text(f"{child.proc.pid}\n")
        running = (Tracked.of(c.name, c.proc.pid) for c in self.children if c.proc is not None)
        record(self.records, [t for t in running if t is not None])

    def raise_if_failed(self) -> None:
        if self.failed:
            raise SystemExit(self.failed)

    def log_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def stop(self, *, timeout_s: float = 15.0) -> None:
        """SIGTERM each child, newest first, then SIGKILL what is left after ``timeout_s``."""
        with self._checking:  # no restart after this
            self._stopping.set()
        for child in reversed(self.children):
            proc = child.proc
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.say(f"[supervisor] {child.name} did not stop in {timeout_s:.0f} s; killing it")
                proc.kill()
                proc.wait()
            (self.run_dir / f"{child.name}.pid").unlink(missing_ok=True)
        self.children.clear()
        self.records.unlink(missing_ok=True)
