"""Faults under ``python -m app.dev.run``, on real processes: its supervisor, its persistent Redis.

One supervised service (embedded Redis with its append-only file, one worker, the API) serves
the whole module; each test SIGKILLs one child at a chosen stage of a real migration on the tiny
models and checks that the service answers again, that the job completes, and that every user
has exactly the expected prompt. The last test stops the service as Ctrl-C does.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis

from app.dev.local_redis import LocalRedis, free_port
from app.dev.processes import Tracked, working_in
from app.store import SEALED, Store
from tests.conftest import ADMIN, READER, ROOT, wait_for
from tests.workers.helpers import (
    DATASET,
    SOURCE,
    SOURCE_EPOCHS,
    TARGET,
    assert_exact_set,
    expected_prompts,
    migration_body,
)

# Short enough that a killed worker's task comes back within seconds; the slow-downs hold the
# stages long enough to kill a worker inside them.
FAULT_ENV = {
    "PM_ENVIRONMENT": "test",
    "PM_ADMIN_TOKEN": ADMIN,
    "PM_READ_TOKEN": READER,
    "PM_CHUNK_SIZE": "3",
    "CELERY_APP": "tests.slow_worker",  # the supervisor's worker runs the slowed-down app
    "TEST_CHUNK_DELAY_S": "1.0",
    "TEST_STAGE_DELAY_S": "3.0",
    "PM_VISIBILITY_TIMEOUT_S": "4",
    "PM_RESTORE_INTERVAL_S": "1",
    "PM_LEASE_TTL_S": "3",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


@dataclass
class Supervised:
    proc: subprocess.Popen[bytes]
    base: str
    run_dir: Path
    out: Path
    redis_url: str
    since: int = 0  # where this run's output starts in ``out``

    def pid(self, name: str) -> int:
        return int((self.run_dir / f"{name}.pid").read_text())

    def output(self) -> str:
        return self.out.read_bytes()[self.since :].decode(errors="replace")

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=10)

    def store(self) -> Store:
        return Store(Redis.from_url(self.redis_url, socket_timeout=5))


def launch(
    tmp: Path, *, port: int, args: list[str], env: dict[str, str] | None = None
) -> Supervised:
    """``python -m app.dev.run --no-demo`` on ``port``, its logs in ``tmp/run``; returns it once the
    API is ready (or once it exits: check ``proc.poll()``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PM_")} | FAULT_ENV | (env or {})
    argv = [sys.executable, "-m", "app.dev.run", "--no-demo", "--port", str(port)]
    argv += ["--run-dir", str(tmp / "run"), *args]
    out = tmp / "app-run.out"
    with out.open("ab") as log:
        since = log.tell()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=log)
    service = Supervised(proc, f"http://127.0.0.1:{port}", tmp / "run", out, "", since)
    try:
        wait_for(lambda: "API ready" in service.output() or proc.poll() is not None, timeout=180)
    except AssertionError:
        stop(service)
        raise
    urls = re.findall(r"local Redis at (redis://\S+);", service.output())
    service.redis_url = urls[-1] if urls else ""
    return service


def stop(service: Supervised) -> None:
    """Ctrl-C, as an operator stops it."""
    if service.proc.poll() is None:
        service.proc.send_signal(signal.SIGINT)
        try:
            service.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            service.proc.kill()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervised]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    tmp = tmp_path_factory.mktemp("run")
    service = launch(tmp, port=free_port(), args=["--data-dir", str(tmp / "data")])
    try:
        assert service.redis_url and service.proc.poll() is None, service.output()
        yield service
    finally:
        stop(service)


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


def reader() -> dict[str, str]:
    return {"Authorization": f"Bearer {READER}"}


def job(http: httpx.Client, job_id: str) -> dict[str, Any] | None:
    """The job's record, or None while the service does not answer."""
    try:
        response = http.get(f"/migrations/{job_id}", headers=reader())
    except httpx.HTTPError:
        return None
    return dict(response.json()) if response.status_code == 200 else None


def wait_state(http: httpx.Client, job_id: str, *, stage: str | None = None) -> dict[str, Any]:
    """The record once the job reaches ``stage``, or ends when no stage is given."""

    def reached() -> dict[str, Any] | None:
        record = job(http, job_id)
        if record is None:
            return None
        if record["state"] in ("failed", "cancelled", "gate_failed"):
            raise AssertionError(f"job ended {record['state']}: {record}")
        done = record["state"] in ("promoted", "succeeded")
        return record if (record["stage"] == stage if stage else done) else None

    result: dict[str, Any] = wait_for(reached, timeout=240, interval=0.1, what=stage or "the end")
    return result


def ready_after(http: httpx.Client, since: float) -> float:
    """Seconds from ``since`` until /readyz answers 200 (Redis and a worker reachable)."""

    def ready() -> bool:
        try:
            return http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout=120, interval=0.1, what="the service to be ready again")
    return time.monotonic() - since


def start_migration(http: httpx.Client) -> str:
    response = http.post("/migrations", json=migration_body(), headers=admin())
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def sealed_sets(store: Store) -> dict[tuple[str, str], dict[str, bytes]]:
    """Every sealed prompt set's values, user by user."""
    out = {}
    for model in (m["name"] for m in store.list_models()):
        for meta in store.list_versions(model):
            if meta.state == SEALED:
                users = store.set_users(model, meta.version)
                values = store.get_prompts(model, meta.version, users)
                out[(model, meta.version)] = {
                    u: v for u, v in zip(users, values, strict=True) if v is not None
                }
    return out


def assert_migrated_exactly(service: Supervised, job_id: str) -> tuple[int, int]:
    """Every user of the finished job has exactly the expected prompt, once; (users, prompts)."""
    store = service.store()
    record = store.get_job(job_id)
    model, version = record["target"]["model"], record["target"]["version"]
    expected = expected_prompts(store, job_id)
    assert_exact_set(store, model, version, expected)  # count, ids, and each user's values
    return len(expected), store.count_keys(model, version)


def kill(service: Supervised, name: str) -> tuple[int, float]:
    pid = service.pid(name)
    os.kill(pid, signal.SIGKILL)
    return pid, time.monotonic()


def assert_restarted(service: Supervised, name: str, pid: int) -> None:
    line = f"{name} (pid {pid}) exited (killed by SIGKILL)"
    wait_for(lambda: line in service.output(), timeout=30, what=line)
    wait_for(lambda: service.pid(name) != pid, timeout=60, what=f"{name} restarted")


def report(what: str, **figures: Any) -> None:
    print(f"\n[fault] {what}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


@pytest.fixture(scope="module")
def source(service: Supervised) -> None:
    with service.http() as http:
        for name in (SOURCE, TARGET):
            response = http.post("/models", json={"name": name}, headers=admin())
            assert response.status_code in (200, 201), response.text
        body = {"dataset": DATASET, "task": "rating", "epochs": SOURCE_EPOCHS}
        response = http.post(f"/models/{SOURCE}/train", json=body, headers=admin())
        assert response.status_code == 201, response.text
        wait_state(http, response.json()["id"])


@pytest.mark.parametrize("stage", ["training", "mapping"])
def test_a_worker_killed_in_a_stage_is_restarted_and_the_job_completes(
    service: Supervised, source: None, stage: str
) -> None:
    with service.http() as http:
        job_id = start_migration(http)
        wait_state(http, job_id, stage=stage)
        if stage == "mapping":  # some chunks written, some not
            wait_for(lambda: (job(http, job_id) or {}).get("progress", {}).get("users_mapped"))
        pid, killed_at = kill(service, "worker")
        assert_restarted(service, "worker", pid)
        answered = ready_after(http, killed_at)
        done = wait_state(http, job_id)
        finished = time.monotonic() - killed_at
    assert done["state"] == "promoted", done
    users, prompts = assert_migrated_exactly(service, job_id)
    report(
        f"worker SIGKILLed in {stage}",
        ready_again_s=round(answered, 1),
        job_done_s=round(finished, 1),
        users=users,
        prompts=prompts,
    )


def test_redis_killed_mid_migration_restarts_on_its_append_only_file(
    service: Supervised, source: None
) -> None:
    with service.http() as http:
        job_id = start_migration(http)
        wait_state(http, job_id, stage="mapping")
        before = sealed_sets(service.store())
        assert before, "no sealed set to check"
        pid, killed_at = kill(service, "redis")
        assert_restarted(service, "redis", pid)
        answered = ready_after(http, killed_at)
        after = sealed_sets(service.store())
        done = wait_state(http, job_id)
        finished = time.monotonic() - killed_at
    assert set(before) <= set(after), "a sealed set is gone"
    assert {key: after[key] for key in before} == before  # byte for byte
    assert done["state"] == "promoted", done
    users, prompts = assert_migrated_exactly(service, job_id)
    checked = sum(len(values) for values in before.values())
    report(
        "redis SIGKILLed in mapping",
        ready_again_s=round(answered, 1),
        job_done_s=round(finished, 1),
        sealed_sets=len(before),
        sealed_prompts=checked,
        users=users,
        prompts=prompts,
    )


def test_ctrl_c_stops_every_child(service: Supervised) -> None:
    pids = [service.pid(name) for name in ("redis", "worker", "api")]
    service.proc.send_signal(signal.SIGINT)
    assert service.proc.wait(timeout=60) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "restarting" not in service.output().split("Stopping ...")[-1]


KINDS = {"celery": "worker", "uvicorn": "api", "app.dev.run": "supervisor"}


def kind_of(entry: Path, data_dir: Path) -> str | None:
    """What ``/proc/PID`` is for ``data_dir``: a redis-server working in it (its title overwrites
    its environment), or a process whose environment names it; a zombie is nothing."""
    if (entry / "comm").read_text().strip() == "redis-server":
        return "redis" if os.readlink(entry / "cwd") == str(data_dir.resolve()) else None
    if f"PM_DATA_DIR={data_dir}".encode() not in (entry / "environ").read_bytes().split(b"\0"):
        return None
    cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    return next((kind for word, kind in KINDS.items() if word in cmdline), None)


def started_for(data_dir: Path) -> dict[str, list[int]]:
    """The live processes of a ``make run`` on ``data_dir``, by kind."""
    found: dict[str, list[int]] = {kind: [] for kind in ("redis", *KINDS.values())}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            kind = kind_of(entry, data_dir)
        except (OSError, UnicodeDecodeError):  # gone meanwhile, or not ours
            continue
        if kind is not None:
            found[kind].append(int(entry.name))
    return found


def end_all(data_dir: Path) -> None:
    """Kill whatever a failed test left running for ``data_dir`` (by pid)."""
    for pids in started_for(data_dir).values():
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


NEEDS_REDIS = pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="redis-server is not installed (apt-get install redis-server)",
)


@NEEDS_REDIS
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="counts processes in /proc")
def test_a_killed_supervisor_leaves_nothing_and_the_next_start_has_the_data(
    tmp_path: Path,
) -> None:
    data_dir, port = tmp_path / "data", free_port()
    env = {"PM_DATA_DIR": str(data_dir)}
    first = launch(tmp_path, port=port, args=[], env=env)
    try:
        assert first.proc.poll() is None, first.output()
        with first.http() as http:
            response = http.post("/models", json={"name": SOURCE}, headers=admin())
            assert response.status_code in (200, 201), response.text
        pid, _ = kill(first, "redis")  # restarted from the supervisor's thread, not the main one
        assert_restarted(first, "redis", pid)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        wait_for(
            lambda: not any(started_for(data_dir).values()),
            timeout=20,
            what=f"the children to die with their supervisor: {started_for(data_dir)}",
        )

        second = launch(tmp_path, port=port, args=[], env=env)
        try:
            assert second.proc.poll() is None, second.output()
            running = {kind: len(pids) for kind, pids in started_for(data_dir).items()}
            assert running == {"redis": 1, "worker": 1, "api": 1, "supervisor": 1}, running
            with second.http() as http:  # the same port, the same store
                models = http.get("/models", headers=reader())
            assert models.status_code == 200 and f'"{SOURCE}"' in models.text, models.text
        finally:
            stop(second)
    finally:
        end_all(data_dir)


@NEEDS_REDIS
def test_a_start_stops_the_store_a_dead_run_left_on_its_data_directory(tmp_path: Path) -> None:
    """What a supervisor leaves where children cannot die with it: its store still running."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (tmp_path / "run").mkdir()
    left = LocalRedis(str(shutil.which("redis-server")), data_dir, persist=True)
    left.start()
    try:
        assert left.proc is not None
        redis = Tracked.of("redis", left.proc.pid)
        assert redis is not None
        dead = Tracked("supervisor", left.proc.pid, "a start time no live process has")
        (tmp_path / "run" / "children").write_text(f"{dead.line()}\n{redis.line()}\n")
        service = launch(tmp_path, port=free_port(), args=["--data-dir", str(data_dir)])
        try:
            assert service.proc.poll() is None, service.output()
            assert left.proc.wait(timeout=30) == 0  # SIGTERM: Redis saved and exited
            assert f"stopping redis (pid {left.proc.pid})" in service.output()
            assert working_in(data_dir, program="redis-server") == [service.pid("redis")]
        finally:
            stop(service)
    finally:
        left.stop()


@NEEDS_REDIS
def test_a_start_refuses_a_data_directory_another_redis_server_serves(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    other = LocalRedis(str(shutil.which("redis-server")), data_dir, persist=True)
    other.start()
    try:
        assert other.proc is not None
        service = launch(tmp_path, port=free_port(), args=["--data-dir", str(data_dir)])
        try:
            assert service.proc.wait(timeout=60) != 0, service.output()
        finally:
            stop(service)
        assert f"pid {other.proc.pid}" in service.output(), service.output()
        assert "Started a local Redis" not in service.output()
    finally:
        other.stop()
