"""What direct readers may read: the keys of the readable sets, granted and revoked by the service.

Redis checks every command a function runs against its caller's ACL, so a direct reader needs
GET and HGET on the keys the read functions read. Granted by pattern (``pm:{*}:u:*``), those
rights would also let it GET the values of a set still being written, or HGET its metadata, by
key name. So the service keeps the key rules of each reader user (``PM_READER_ACL_USERS``) to
the active pointers and the meta and value keys of the sets readable now (sealed, not deleted):
a set is granted once sealed, before anything can promote it, and revoked when it is deleted,
before its values go. A restarted Redis forgets runtime ACL changes (unless it saves an aclfile),
so the API checks the grants every few seconds; until then the reader is refused (NOPERM), never
granted more. The service's own Redis user needs ``+acl|getuser`` and ``+acl|setuser``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from redis.cluster import RedisCluster
from redis.exceptions import NoPermissionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.errors import ServiceError
from app.store import keys
from app.store.base import StoreBase, as_text
from app.store.connect import REDIS_DOWN
from app.store.keys import SetKeys
from app.store.meta import SEALED

log = logging.getLogger(__name__)

# How long one sync may hold the lock (a sync takes milliseconds; a dead holder's lock lapses).
_LOCK_TTL_MS = 10_000
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end"


class ReaderAclError(ServiceError):
    """The service may not set the readers' grants: its own Redis user lacks the ACL commands."""

    status_code = 500
    code = "reader_acl"


# What the periodic check logs and tries again later.
_CHECK_AGAIN: tuple[type[Exception], ...] = (*REDIS_DOWN, ReaderAclError)


def escape_glob(text: str) -> str:
    """``text`` as a Redis glob pattern that matches only itself."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def reader_key_patterns(readable: Iterable[tuple[str, str]]) -> list[str]:
    """A reader's key rules: read access to the active pointers, and to the meta and value keys
    of each readable ``(model, version)``."""
    patterns = [f"%R~{escape_glob(keys.ACTIVE)}"]
    for model, version in sorted(readable):
        set_keys = SetKeys(model, version)
        patterns += [f"%R~{escape_glob(set_keys.meta)}", f"%R~{escape_glob(set_keys.values)}*"]
    return patterns


def _granted(reply: Any) -> set[str] | None:
    """The key patterns in an ACL GETUSER reply (RESP2 list or RESP3 map); None: no such user."""
    if reply is None:
        return None
    fields = reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=True))
    found = {str(as_text(name)): value for name, value in fields.items()}.get("keys") or []
    if isinstance(found, (bytes, str)):
        found = str(as_text(found)).split()
    return {str(as_text(pattern)) for pattern in found}


class ReaderAclMixin(StoreBase):
    def readable_sets(self) -> list[tuple[str, str]]:
        """``(model, version)`` of every sealed set that still exists."""
        models = sorted(str(as_text(m)) for m in self.redis.hkeys(keys.MODELS))
        pipe = self.redis.pipeline(transaction=False)
        for model in models:
            pipe.zrange(keys.versions_key(model), 0, -1)
        found = [
            (model, str(as_text(version)))
            for model, versions in zip(models, pipe.execute(), strict=True)
            for version in versions
        ]
        pipe = self.redis.pipeline(transaction=False)
        for model, version in found:
            pipe.hget(SetKeys(model, version).meta, "state")
        states = pipe.execute()
        return [pair for pair, state in zip(found, states, strict=True) if as_text(state) == SEALED]

    def sync_reader_acl(self) -> bool:
        """Grant each reader user the keys of the readable sets and no others, on every node
        where its grants differ; True when any changed. Nothing to do without reader users, or
        on a node that has no such user (the operator creates it, with the base rules)."""
        if not self.reader_acl_users:
            return False
        try:
            with self._reader_acl_lock():
                return self._grant(reader_key_patterns(self.readable_sets()))
        except NoPermissionError as error:
            raise ReaderAclError(
                f"The service's Redis user may not set the direct readers' grants ({error}): "
                "give it +acl|getuser and +acl|setuser, or empty PM_READER_ACL_USERS."
            ) from None

    def _grant(self, patterns: list[str]) -> bool:
        changed = False
        for target in self._acl_targets():
            for user in self.reader_acl_users:
                granted = _granted(self.redis.execute_command("ACL", "GETUSER", user, **target))
                if granted is None or granted == set(patterns):
                    continue
                self.redis.execute_command("ACL", "SETUSER", user, "resetkeys", *patterns, **target)
                changed = True
        return changed

    def _acl_targets(self) -> list[dict[str, Any]]:
        """Where the ACL users live: each node keeps its own (a Cluster's replicas included)."""
        if isinstance(self.redis, RedisCluster):
            return [{"target_nodes": node} for node in self.redis.get_nodes()]
        return [{}]

    @contextlib.contextmanager
    def _reader_acl_lock(self) -> Iterator[None]:
        """One sync at a time: a sync that listed the sets before another process sealed one
        must not set its older list after that process's sync."""
        token, deadline = uuid.uuid4().hex, time.monotonic() + 2 * _LOCK_TTL_MS / 1000
        while not self.redis.set(keys.READER_ACL_LOCK, token, nx=True, px=_LOCK_TTL_MS):
            if time.monotonic() > deadline:
                raise RedisTimeoutError("the direct readers' grants stayed locked; retry later")
            time.sleep(0.02)
        try:
            yield
        finally:
            self.redis.eval(_RELEASE, 1, keys.READER_ACL_LOCK, token)


async def keep_reader_acl(store: ReaderAclMixin, *, every_s: float) -> None:
    """Check the readers' grants every ``every_s`` seconds until cancelled: a restarted Redis,
    or an operator's ACL change, is repaired within that."""
    if not store.reader_acl_users:
        return
    while True:
        await asyncio.sleep(every_s)
        try:
            if await asyncio.to_thread(store.sync_reader_acl):
                log.info("updated the grants of %s", ", ".join(store.reader_acl_users))
        except _CHECK_AGAIN as error:
            log.warning("could not check the direct readers' grants: %s", error)
