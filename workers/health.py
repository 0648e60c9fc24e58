"""The worker container's healthcheck: ``python -m workers.health`` asks this worker itself.

A Celery ping addressed to ``worker@<hostname>`` (the node name docker-compose gives it), so a
healthy worker elsewhere on the broker cannot answer for a hung or disconnected one. A solo-pool
worker inside a stage does not answer pings until the stage ends, which may take hours; it is
healthy while the stage's lease heartbeat, a thread of that worker, still marks its host busy.
Exit status 0 when it answered or is busy, 1 otherwise, with the reason on stderr.
"""

from __future__ import annotations

import socket
import sys

from celery import Celery

from app.config import get_settings
from app.store import Store, connect_redis


def node_name(hostname: str | None = None) -> str:
    return f"worker@{hostname or socket.gethostname()}"


def ping(celery: Celery, node: str, *, timeout_s: float) -> bool:
    replies = celery.control.ping(destination=[node], timeout=timeout_s) or []
    return any(node in reply for reply in replies)


def default_store() -> Store:
    settings = get_settings()
    redis = connect_redis(settings.redis_url, timeout_s=5.0, cluster=settings.redis_cluster)
    return Store(redis)


def main(
    argv: list[str] | None = None, *, celery: Celery | None = None, store: Store | None = None
) -> int:
    args = sys.argv[1:] if argv is None else argv
    node = args[0] if args else node_name()
    if celery is None:
        from workers.celery_app import app as celery
    try:
        if ping(celery, node, timeout_s=5.0):
            return 0
        if (store or default_store()).busy_on(node.partition("@")[2]):
            return 0
        reason = "did not answer a ping and runs no stage"
    except Exception as error:  # the broker itself is unreachable
        reason = f"could not be asked ({error})"
    print(f"{node} {reason}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
