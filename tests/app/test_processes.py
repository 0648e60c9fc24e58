"""What ``make run`` does about children that outlive it, on real processes (``app.dev.processes``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.dev.processes import Tracked, record, recorded, stop_leftovers
from tests.conftest import ROOT, wait_for

RECORD_AND_EXIT = """
import sys
from pathlib import Path
from app.dev.processes import Tracked, record
worker, api = (int(pid) for pid in sys.argv[2:])
record(Path(sys.argv[1]), [Tracked.of("worker", worker), Tracked("api", api, "another start")])
"""

# A parent that starts a child the way the supervisor restarts one: from a thread that lives on
# (the kernel signals the child when the thread that forked it ends); prints its pid and waits.
PARENT = """
import signal, subprocess, threading
from app.dev.processes import die_with_parent
def spawn():
    child = subprocess.Popen(["sleep", "300"], preexec_fn=die_with_parent(signal.SIGKILL))
    print(child.pid, flush=True)
    threading.Event().wait()
threading.Thread(target=spawn, daemon=True).start()
threading.Event().wait()
"""


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [subprocess.Popen(["sleep", "300"]) for _ in range(2)]
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_dead_owners_children_are_stopped_and_a_recycled_pid_is_left_alone(
    tmp_path: Path, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    path = tmp_path / "children"
    worker, bystander = sleepers  # the api's record names bystander's pid with another start
    argv = [sys.executable, "-c", RECORD_AND_EXIT, str(path), str(worker.pid), str(bystander.pid)]
    subprocess.run(argv, cwd=ROOT, check=True)
    owner = recorded(path)[0]
    assert owner.name == "supervisor" and not owner.alive()
    said: list[str] = []
    stop_leftovers(path, say=said.append)
    assert worker.wait(timeout=30) == -signal.SIGTERM
    assert bystander.poll() is None
    assert said == [f"[supervisor] stopping worker (pid {worker.pid}), left by a run that died"]
    assert not path.exists()


def test_a_live_owners_children_are_left_alone(
    tmp_path: Path, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    path = tmp_path / "children"
    child = Tracked.of("worker", sleepers[0].pid)
    assert child is not None
    record(path, [child])  # this test process is the owner, alive
    stop_leftovers(path, say=print)
    assert sleepers[0].poll() is None
    assert recorded(path)[1:] == [child]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a Linux parent-death signal")
def test_a_child_dies_with_its_parent() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    try:
        child = Tracked.of("sleep", pid)
        assert child is not None and child.alive()
        parent.kill()
        parent.wait()
        wait_for(lambda: not child.alive(), timeout=30, what="the child to die with its parent")
    finally:
        left = Tracked.of("sleep", pid)
        if left is not None:
            os.kill(pid, signal.SIGKILL)
