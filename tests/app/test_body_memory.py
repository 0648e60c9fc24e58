"""Large chunked bodies against the real server (uvicorn): refused ones do not move its memory.

The API runs as ``uvicorn app.main:app`` in a subprocess against the test Redis; its peak
resident memory (``VmHWM``) is read from ``/proc`` before and after a few 200 MB chunked bodies,
sent without a token and with one. Only what the body limit allows may be read.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.dev.local_redis import free_port
from tests.conftest import ROOT, RedisServer, make_settings, reader, worker_env

LIMIT = 1024 * 1024  # PM_MAX_BODY_BYTES for this server
BODY = 200 * 1024 * 1024
MARGIN = 48 * 1024 * 1024  # allocator slack, buffers, the first requests' lazy imports


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def _body(size: int) -> Iterator[bytes]:
    chunk = b'{"user_ids": [' + b'"u1", ' * (64 * 1024 // 6)
    sent = 0
    while sent < size:
        yield chunk
        sent += len(chunk)


@pytest.fixture
def api(redis_server: RedisServer, tmp_path: Path) -> Iterator[tuple[str, int]]:
    settings = make_settings(redis_server, max_body_bytes=LIMIT)
    port, log = free_port(), tmp_path / "uvicorn.log"
    args = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1"]
    args += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=worker_env(settings), stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield base, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _send(base: str, headers: dict[str, str]) -> int:
    """POST /prompts/batch with a 200 MB chunked body (uvicorn drains what the app left unread,
    so the client gets its answer once it has sent everything)."""
    response = httpx.post(
        f"{base}/prompts/batch",
        content=_body(BODY),
        timeout=120,
        headers=headers | {"Content-Type": "application/json"},
    )
    return response.status_code


def test_large_chunked_bodies_do_not_move_peak_memory(api: tuple[str, int]) -> None:
    base, pid = api
    # Warm up the paths the refusals take (imports, the OpenAPI document, a small batch).
    small = {"user_ids": ["u1"]}
    assert httpx.post(f"{base}/prompts/batch", json=small).status_code == 401
    assert httpx.post(f"{base}/prompts/batch", json=small, headers=reader()).status_code == 404
    before = _peak_rss(pid)
    statuses = [
        _send(base, {}),
        _send(base, {"Authorization": "Bearer wrong-token"}),
        _send(base, reader()),
    ]
    after = _peak_rss(pid)
    print(
        f"\n[body-memory] VmHWM before {before / 2**20:.1f} MiB, after {after / 2**20:.1f} MiB, "
        f"statuses {statuses}"
    )
    assert after - before <= LIMIT + MARGIN, (before, after)
    assert statuses == [401, 401, 413]
