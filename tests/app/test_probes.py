"""Readiness probes, however many arrive at once, never wedge the API (a real uvicorn process)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis

from app.config import Settings
from app.dev.local_redis import free_port
from tests.conftest import ROOT, reader, wait_for, worker_env


@pytest.fixture
def api(settings: Settings, store_redis: Redis, tmp_path: Path) -> Iterator[str]:
    """``uvicorn app.main:app`` on the test Redis, as deployments run it; its base URL."""
    port = free_port()
    log = (tmp_path / "api.log").open("wb")
    args = [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port)]
    proc = subprocess.Popen(
        [*args, "--no-access-log"], cwd=ROOT, env=worker_env(settings), stdout=log, stderr=log
    )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None  # exited: fail below rather than wait

    try:
        wait_for(answers, timeout=60, what="the API to start")
        assert proc.poll() is None, (tmp_path / "api.log").read_text()
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:  # a wedged API may not finish its shutdown
            proc.kill()
            proc.wait()
        log.close()


PROBES = 100
PROBE_TIMEOUT_S = 10.0  # what a kubelet would give a readiness probe, generously


def test_a_hundred_concurrent_readiness_probes_leave_every_route_answering(api: str) -> None:
    async def storm() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=PROBES + 10)
        async with httpx.AsyncClient(base_url=api, timeout=PROBE_TIMEOUT_S, limits=limits) as http:
            probes = [asyncio.create_task(http.get("/readyz")) for _ in range(PROBES)]
            await asyncio.sleep(0.5)  # the probes are in flight
            for path in ("/healthz", "/models", "/metrics", "/migrations"):
                answer = await http.get(path, headers=reader())
                assert answer.status_code == 200, (path, answer.text)
            return await asyncio.gather(*probes)

    answers = asyncio.run(storm())
    assert len(answers) == PROBES
    # No worker runs here, so the service is not ready; every probe must say so, and why.
    for answer in answers:
        assert answer.status_code == 503
        assert answer.json()["checks"] == {"redis": "ok", "workers": "no worker answered"}
    after = httpx.get(f"{api}/models", headers=reader(), timeout=PROBE_TIMEOUT_S)
    assert after.status_code == 200
