"""``make run``: the whole service on one machine, then a guided real migration over HTTP.

Starts a local redis-server when PM_REDIS_URL is not set (its append-only file in the data
directory, so a restart keeps every model, set and job), one Celery worker (solo pool, queues
gpu+default) and the API (uvicorn), and supervises them: a child that dies is started again.
Prints dev tokens, then walks through: register SmolLM2 and Gemma, train SmolLM2 prompts for a
few MovieLens-100K users, migrate them to Gemma with live progress, and print the before/after
metrics and a curl for one user's prompt. Dev only: in production run ``uvicorn app.main:app``
and ``celery -A workers.celery_app worker`` under the platform's own supervisor.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

from app.dev.demo import Demo
from app.dev.local_redis import LocalRedis, free_port
from app.dev.processes import die_with_parent, working_in
from app.dev.supervise import Spawn, Supervisor
from app.jobs.queue import worker_command

ROOT = Path(__file__).resolve().parents[2]  # the repository: the children run from it
RUN_DIR = ROOT / ".run"
DATA_ENV = "PM_DATA_DIR"
REDIS_LOAD_TIMEOUT_S = 120.0  # a large append-only file takes a while to load


def pick_port(wanted: int | None) -> int:
    if wanted is not None:
        return wanted
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 8000))
            return 8000
        except OSError:
            return free_port()  # 8000 is taken: any free port will do for a dev run


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary:
        return binary
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("redis-server not found; installing it with apt-get ...")
        subprocess.run(["apt-get", "install", "-y", "-q", "redis-server"], check=False)
        binary = shutil.which("redis-server")
    if not binary:
        raise SystemExit(
            "redis-server is not installed. Install it (apt-get install redis-server, "
            "brew install redis) or point PM_REDIS_URL at a running Redis."
        )
    return binary


def default_data_dir() -> Path:
    """Where the embedded Redis keeps its append-only file: ``$PM_DATA_DIR``, else ``redis/``
    in the asset cache, outside the repository and beside the checkpoints."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    from models.assets import cache_dir

    return cache_dir() / "redis"


def lock_data_dir(data_dir: Path) -> IO[bytes]:
    """Hold the data directory for this process: two servers appending to one file corrupt it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = (data_dir / "lock").open("wb")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SystemExit(
            f"Another `make run` uses the data directory {data_dir}: stop it, or give this one "
            f"its own with {DATA_ENV}=DIR or --data-dir DIR."
        ) from None
    return handle


def refuse_a_second_store(data_dir: Path) -> None:
    """Two redis-servers appending to one directory corrupt it, whoever started the other."""
    pids = " ".join(map(str, working_in(data_dir, program="redis-server")))
    if pids:
        raise SystemExit(
            f"A redis-server (pid {pids}) already serves the data directory {data_dir}, and this "
            f"run directory has no record of it: stop it (kill {pids}), then start again."
        )


def reset_data_dir(data_dir: Path) -> None:
    """``--fresh``: drop the store's files, so the embedded Redis starts empty."""
    shutil.rmtree(data_dir / "appendonlydir", ignore_errors=True)
    (data_dir / "dump.rdb").unlink(missing_ok=True)
    print(f"--fresh: removed the stored data in {data_dir}")


def start_redis(supervisor: Supervisor, *, data_dir: Path) -> str:
    log = supervisor.log_path("redis")
    # SIGTERM: Redis writes out its append-only file and exits at once.
    server = LocalRedis(
        redis_binary(),
        data_dir,
        log=log,
        persist=True,
        own_group=True,
        preexec_fn=die_with_parent(signal.SIGTERM),
    )

    def spawn() -> subprocess.Popen[bytes]:
        server.start(timeout_s=REDIS_LOAD_TIMEOUT_S)  # same port: clients reconnect by themselves
        assert server.proc is not None
        return server.proc

    try:
        supervisor.start("redis", spawn)
    except RuntimeError as error:
        raise SystemExit(str(error)) from None
    return server.url()


def prepare_env(supervisor: Supervisor, args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PM_ENVIRONMENT", "development")
    if not env.get("PM_REDIS_URL"):
        env["PM_REDIS_URL"] = start_redis(supervisor, data_dir=args.data_dir)
        print(
            f"Started a local Redis at {env['PM_REDIS_URL']}; its data persists in "
            f"{args.data_dir} (--fresh starts empty)."
        )
    elif args.fresh:
        print("--fresh applies to the embedded Redis only; PM_REDIS_URL is left as it is.")
    # Stages hold leases, so a short visibility timeout is safe: a killed worker's task comes
    # back within a minute or so instead of the production default's hour.
    env.setdefault("PM_VISIBILITY_TIMEOUT_S", "60")
    env.setdefault("PM_LEASE_TTL_S", "30")
    env.setdefault("PM_ADMIN_TOKEN", secrets.token_urlsafe(32))
    env.setdefault("PM_READ_TOKEN", secrets.token_urlsafe(32))
    # The worker's Celery app; CELERY_APP names another, as it does for ``celery`` itself.
    env.setdefault("CELERY_APP", "workers.celery_app")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawner(supervisor: Supervisor, name: str, args: list[str], env: dict[str, str]) -> Spawn:
    def spawn() -> subprocess.Popen[bytes]:
        with supervisor.log_path(name).open("ab") as log:
            # Its own process group: Ctrl-C reaches the supervisor alone, which stops the
            # children in order instead of racing their restarts.
            # SIGKILL when the supervisor dies: a worker's warm shutdown would first finish its
            # task; the broker delivers a killed task again, as after any worker crash.
            return subprocess.Popen(
                args,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=log,
                process_group=0,
                preexec_fn=die_with_parent(signal.SIGKILL),
            )

    return spawn


def start_services(supervisor: Supervisor, env: dict[str, str], port: int) -> None:
    from app.config import Settings

    Settings(**{})  # validates the environment before anything else starts
    py = sys.executable
    worker = worker_command(app=env["CELERY_APP"], node="dev@%h")
    api = [py, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    supervisor.start("worker", spawner(supervisor, "worker", worker, env))
    supervisor.start("api", spawner(supervisor, "api", api, env))


def wait_ready(supervisor: Supervisor, base: str, *, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        supervisor.raise_if_failed()
        try:
            if httpx.get(f"{base}/readyz", timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"The service did not become ready; see the logs in {supervisor.run_dir}.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=None, help="default: 8000, else a free one")
    parser.add_argument("--no-demo", action="store_true", help="only start the service")
    parser.add_argument("--exit-after-demo", action="store_true", help="stop after the walk")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"the embedded Redis's data (default: ${DATA_ENV}, else the asset cache's redis/)",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="start the embedded Redis empty (drops its data)"
    )
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR, help="logs and pid files")
    parser.add_argument("--users", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=6, help="prompt-training epochs")
    parser.add_argument(
        "--adapter-epochs", type=int, help="the adapter's epoch cap (default: the recipe's)"
    )
    parser.add_argument(
        "--max-train", type=int, default=30, help="training interactions per user (CPU budget)"
    )
    parser.add_argument("--budget", type=int, default=40, help="users the adapter trains on")
    args = parser.parse_args(argv)
    args.data_dir = args.data_dir or default_data_dir()
    return args


def serve(supervisor: Supervisor, args: argparse.Namespace) -> None:
    env = prepare_env(supervisor, args)
    os.environ.update(env)
    port = pick_port(args.port)
    start_services(supervisor, env, port)
    supervisor.watch()
    base = f"http://127.0.0.1:{port}"
    wait_ready(supervisor, base)
    print(f"\nAPI ready at {base} (docs: {base}/docs); logs in {args.run_dir}", flush=True)
    print(f"  admin token: {env['PM_ADMIN_TOKEN']}")
    print(f"  read token:  {env['PM_READ_TOKEN']}", flush=True)
    if not args.no_demo:
        Demo(base, env["PM_ADMIN_TOKEN"], env["PM_READ_TOKEN"], args).run()
    if args.exit_after_demo:
        return
    print("\nThe service keeps running; press Ctrl-C to stop it.", flush=True)
    while True:
        supervisor.raise_if_failed()
        time.sleep(1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    embedded = not os.environ.get("PM_REDIS_URL")
    lock = lock_data_dir(args.data_dir) if embedded else None
    supervisor = Supervisor(args.run_dir, say=lambda line: print(line, flush=True))
    supervisor.stop_leftovers()  # before anything starts: a dead run's store, worker and API
    if embedded:
        refuse_a_second_store(args.data_dir)
    if embedded and args.fresh:
        reset_data_dir(args.data_dir)
    # Both explicit: a shell that starts this in the background leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        serve(supervisor, args)
    except KeyboardInterrupt:
        print("\nStopping ...", flush=True)
    finally:
        supervisor.stop()
        if lock is not None:
            lock.close()


if __name__ == "__main__":
    main()
