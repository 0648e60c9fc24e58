"""Processes that must not outlive ``make run``'s supervisor, and the next start's clean-up.

Two defences. On Linux each child asks the kernel for a signal when its parent dies
(``die_with_parent``), so a SIGKILLed supervisor takes its children with it at once. And the
supervisor records its children with their start times (``record``); the next start stops the
recorded ones still alive before it starts anything (``stop_leftovers``), for systems without
that signal and for a child that ignored it. The start time tells a child from an unrelated
process that was given its pid since.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def start_time(pid: int) -> str | None:
    """When ``pid`` started, as the system tells it; None once it is gone (or a zombie)."""
    if not Path("/proc/self/stat").exists():  # not Linux: ask ps
        out = subprocess.run(
            ["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True
        )
        return out.stdout.strip() or None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the name, which may hold spaces
    return None if fields[0] in ("Z", "X") else fields[19]  # the state; starttime is field 22


@dataclass(frozen=True)
class Tracked:
    """A process as recorded: ``name pid start-time``, one line."""

    name: str
    pid: int
    started: str

    @classmethod
    def of(cls, name: str, pid: int) -> Tracked | None:
        started = start_time(pid)
        return cls(name, pid, started) if started is not None else None

    @classmethod
    def parse(cls, line: str) -> Tracked:
        name, pid, started = line.split(maxsplit=2)
        return cls(name, int(pid), started)

    def line(self) -> str:
        return f"{self.name} {self.pid} {self.started}"

    def alive(self) -> bool:
        return start_time(self.pid) == self.started


def record(path: Path, children: Iterable[Tracked]) -> None:
    """This process (the owner, first) and its children, replaced whole: never half a file."""
    owner = Tracked.of("supervisor", os.getpid())
    assert owner is not None
    part = path.with_name(path.name + ".part")
    part.write_text("".join(f"{t.line()}\n" for t in (owner, *children)))
    part.replace(path)


def recorded(path: Path) -> list[Tracked]:
    try:
        return [Tracked.parse(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):  # none yet, or not ours: nothing to act on
        return []


def stop_leftovers(path: Path, *, say: Callable[[str], None], timeout_s: float = 10.0) -> None:
    """Stop the children a dead owner recorded in ``path``, newest first (the store last)."""
    records = recorded(path)
    if not records or records[0].alive():  # nothing recorded, or its owner still runs them
        return
    for child in reversed(records[1:]):
        if child.alive():
            say(f"[supervisor] stopping {child.name} (pid {child.pid}), left by a run that died")
            terminate(child, timeout_s=timeout_s)
    path.unlink(missing_ok=True)


def terminate(process: Tracked, *, timeout_s: float) -> None:
    """SIGTERM (and SIGCONT: a stopped process acts on nothing else), then SIGKILL if it still
    runs after ``timeout_s``."""
    for signals, wait_s in (
        ((signal.SIGTERM, signal.SIGCONT), timeout_s),
        ((signal.SIGKILL,), 5.0),
    ):
        with contextlib.suppress(ProcessLookupError):
            for sig in signals:
                os.kill(process.pid, sig)
        if gone(process, timeout_s=wait_s):
            return


def gone(process: Tracked, *, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while process.alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def exit_on_sigterm() -> None:
    """Make SIGTERM exit like an error that unwinds, so ``finally`` blocks and context managers
    stop the processes this one started (the default action kills it on the spot)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def die_with_parent(sig: signal.Signals) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send ``sig`` to the child when its parent dies (Linux;
    None elsewhere). The kernel means the parent *thread*: start children from a thread that
    lives as long as the process."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()

    def arm() -> None:
        if prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), sig)

    return arm


def working_in(directory: Path, *, program: str) -> list[int]:
    """The pids of ``program`` processes whose working directory is ``directory`` (Linux: read
    from /proc; elsewhere none are found)."""
    target = str(directory.resolve())
    return [
        int(entry.name) for entry in Path("/proc").glob("[0-9]*") if _is(entry, program, target)
    ]


def _is(entry: Path, program: str, cwd: str) -> bool:
    try:
        named = (entry / "comm").read_text().strip() == program
        return (
            named and os.readlink(entry / "cwd") == cwd and start_time(int(entry.name)) is not None
        )
    except OSError:  # gone meanwhile, or another user's
        return False
