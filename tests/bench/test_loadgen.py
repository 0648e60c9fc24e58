"""Stopping a load generator that reports on SIGINT only once it has set its handler."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from bench import loadgen

# Killed by SIGINT for half a second, then reports on it: as wrk, which sets its handler once its
# threads run.
LATE_HANDLER = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_DFL)
print("started", flush=True)
time.sleep(0.5)
signal.signal(signal.SIGINT, lambda *_: (print("report", flush=True), sys.exit(0)))
while True:
    time.sleep(0.05)
"""


def test_a_signal_waits_for_the_handler_that_reports() -> None:
    proc = subprocess.Popen([sys.executable, "-c", LATE_HANDLER], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "started\n"
    loadgen.wait_handling(proc.pid, signal.SIGINT, timeout_s=10)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=10)
    assert out == "report\n"


def test_a_process_that_exited_is_not_waited_for() -> None:
    proc = subprocess.Popen(["/bin/sh", "-c", "exit 3"])
    status = Path(f"/proc/{proc.pid}/status")
    while "State:\tZ" not in status.read_text():
        pass  # until it has exited, not yet reaped
    loadgen.wait_handling(proc.pid, signal.SIGINT, timeout_s=10)  # returns at once
    assert proc.wait(timeout=10) == 3
