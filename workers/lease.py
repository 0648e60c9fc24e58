"""A stage's lease: a redelivered task does not run a stage that a live worker still runs.

With a Redis broker, Celery delivers an unacknowledged task again once the visibility timeout
passes, whether or not the first worker is still on it, so a stage longer than the timeout
would run twice at once. The running stage holds a lease in the store and a thread renews it
every third of its TTL; a second delivery that finds it held raises ``LeaseHeld`` (its task
comes back later), and one that finds it lapsed, because the holder died, runs the stage.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator

from app.store import REDIS_DOWN, Store

log = logging.getLogger(__name__)


class LeaseHeld(Exception):
    """Another live worker runs this stage; try again later."""


class RunsExhausted(Exception):
    """The stage's worker died in each of its last runs: its job fails instead of another try."""


def holder_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _renew(
    store: Store, job_id: str, name: str, *, holder: str, ttl_s: float, stop: threading.Event
) -> None:
    while not stop.wait(ttl_s / 3):
        try:
            store.mark_busy(socket.gethostname(), holder=holder, ttl_s=ttl_s)
            if not store.renew_lease(job_id, name, holder=holder, ttl_s=ttl_s):
                log.warning("lost the lease on %s of job %s; it may run elsewhere", name, job_id)
                return
        except REDIS_DOWN:  # the next beat tries again; the lease outlives a short outage
            continue


def check_runs(store: Store, job_id: str, name: str, *, max_runs: int) -> None:
    """Refuse a run after ``max_runs`` that started and never ended: with late acknowledgement,
    a task that kills its worker (out of memory, a crash in native code) is otherwise delivered
    again for ever."""
    counters = store.counters(job_id)
    died = counters.get(f"ran:{name}", 0) - counters.get(f"ended:{name}", 0)
    if died >= max_runs:
        raise RunsExhausted(
            f"stage {name} was started {died} times and its worker died each time before it "
            "ended (killed, often for lack of memory); the job was abandoned so that it is not "
            "delivered again. Check the worker's log and memory limit, then retry with less work "
            "(a smaller adapter.hidden, batch_size, chunk_size or max_users)."
        )


@contextlib.contextmanager
def held(store: Store, job_id: str, name: str, *, ttl_s: float, max_runs: int) -> Iterator[None]:
    """Run the body as the lease's holder, renewed in the background until it ends; at most
    ``max_runs`` runs may die before it (see ``check_runs``)."""
    holder = holder_name()
    if not store.take_lease(job_id, name, holder=holder, ttl_s=ttl_s):
        store.count(job_id, f"waited:{name}")
        raise LeaseHeld(f"stage {name} of job {job_id} runs on {store.lease_holder(job_id, name)}")
    try:
        check_runs(store, job_id, name, max_runs=max_runs)
    except RunsExhausted:
        store.drop_lease(job_id, name, holder=holder)
        raise
    store.count(job_id, f"ran:{name}")
    store.mark_busy(socket.gethostname(), holder=holder, ttl_s=ttl_s)
    stop = threading.Event()
    beat = threading.Thread(
        target=_renew,
        args=(store, job_id, name),
        kwargs={"holder": holder, "ttl_s": ttl_s, "stop": stop},
        name=f"lease-{name}",
        daemon=True,
    )
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(*REDIS_DOWN):  # it lapses by itself
            store.count(job_id, f"ended:{name}")  # this run did not die (see check_runs)
            store.drop_lease(job_id, name, holder=holder)
