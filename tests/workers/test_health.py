"""The worker healthcheck asks one worker by its node name, on a real broker."""

from __future__ import annotations

import socket
from collections.abc import Callable

from app.config import Settings
from tests.conftest import Worker
from workers.celery_app import make_celery
from workers.health import main, node_name


def test_the_healthcheck_passes_for_the_live_worker_only(
    settings: Settings, start_worker: Callable[[Settings], Worker]
) -> None:
    worker = start_worker(settings)
    celery = make_celery(settings)
    host = socket.gethostname()
    assert main([f"{worker.name}@{host}"], celery=celery) == 0
    # Another worker's answer does not count for this one.
    assert main([node_name("no-such-host")], celery=celery) == 1
    worker.kill()
    assert main([f"{worker.name}@{host}"], celery=celery) == 1
