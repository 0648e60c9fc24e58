"""Followed sets: a migration's target follows the sets it was made from until they are gone.

A write to a followed set (onboarding, an update, an erasure) records the user in a pending hash
per follower, on the followed set's hash tag and in the same transaction as the write, so no
write is ever missed, on Redis Cluster too. A follow task (workers/follow.py) applies the pending
users to the follower from their *latest* values, then acknowledges each entry only if no newer
write replaced it meanwhile. Each entry carries the write's stamp (wall-clock ns): a follower
keeps the stamp its value came from per user, and an older write never replaces a newer one,
whichever order the follow applies them in.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prompt_migration_client import codec
from redis.client import Pipeline

from app.errors import ConflictError, NotFoundError
from app.store.base import StoreBase, as_bytes, as_text
from app.store.keys import SetKeys, set_name
from app.store.meta import SEALED, parse_meta

# Delete each pending entry (ARGV: user, stamp, ...) only if it still holds that stamp: a write
# that landed since the entry was read stays pending.
_ACK_LUA = """
local removed = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    removed = removed + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return removed
"""


@dataclass(frozen=True)
class Follower:
    """A set that follows another, and the job that made it (its adapter maps the users)."""

    model: str
    version: str
    job_id: str

    @property
    def name(self) -> str:
        return set_name(self.model, self.version)


@dataclass(frozen=True)
class Change:
    """One user's latest state in a followed set: the follower's new value, or None (erased)."""

    user: str
    value: bytes | None
    stamp: int


@dataclass(frozen=True)
class Applied:
    created: int  # users the follower did not hold
    removed: int  # users it held and lost
    followers: list[Follower]  # its own followers, who have pending users now


def stamp_now() -> int:
    return time.time_ns()


def parse_followers(raw: dict[Any, Any]) -> list[Follower]:
    followers = []
    for name, job_id in raw.items():
        model, version = str(as_text(name)).split("/", 1)
        followers.append(Follower(model, version, str(as_text(job_id))))
    return sorted(followers, key=lambda f: f.name)


def record_pending(
    pipe: Pipeline, set_keys: SetKeys, followers: Sequence[Follower], *, user: str, stamp: int
) -> None:
    """Inside a write's transaction on ``set_keys``: ``user`` is pending for each follower."""
    for follower in followers:
        pipe.hset(set_keys.pending(follower.name), user, stamp)


class FollowMixin(StoreBase):
    def follow(
        self, *, follower: tuple[str, str], followed: Sequence[tuple[str, str]], job_id: str
    ) -> None:
        """From now on, every write to each ``followed`` set is pending for ``follower``.

        Idempotent; recorded before the job lists its users, so a user written at any moment is
        either listed (and mapped from the value it reads) or pending."""
        name = set_name(*follower)
        for model, version in followed:
            self.redis.hset(SetKeys(model, version).followers, name, job_id)
            self.redis.hset(SetKeys(*follower).follows, set_name(model, version), job_id)

    def followed_sets(self, model: str, version: str) -> list[tuple[str, str]]:
        raw = self.redis.hkeys(SetKeys(model, version).follows)
        return sorted(tuple(str(as_text(n)).split("/", 1)) for n in raw)  # type: ignore[misc]

    def followers(self, model: str, version: str) -> list[Follower]:
        return parse_followers(self.redis.hgetall(SetKeys(model, version).followers))

    def unfollow(self, *, follower: tuple[str, str], followed: tuple[str, str]) -> None:
        """``follower`` stops following ``followed``: its writes are no longer recorded."""
        followed_keys, name = SetKeys(*followed), set_name(*follower)
        self.redis.hdel(followed_keys.followers, name)
        self.redis.delete(followed_keys.pending(name))
        self.redis.hdel(SetKeys(*follower).follows, set_name(*followed))

    def unlink_follows(self, model: str, version: str) -> None:
        """The set is going: it follows nothing any more, and nothing follows it."""
        name = set_name(model, version)
        for followed in self.followed_sets(model, version):
            followed_keys = SetKeys(*followed)
            self.redis.hdel(followed_keys.followers, name)
            self.redis.delete(followed_keys.pending(name))
        for follower in self.followers(model, version):
            self.redis.hdel(SetKeys(follower.model, follower.version).follows, name)

    # ---- waking the follow task ---------------------------------------------------------------

    def claim_wake(self, model: str, version: str, *, ttl_s: float) -> bool:
        """True when no follow task is on its way to the set: the caller sends one. A task
        clears the claim before it reads the pending users, so none is ever left unread."""
        key = SetKeys(model, version).wake
        return bool(self.redis.set(key, 1, nx=True, px=max(1, int(ttl_s * 1000))))

    def clear_wake(self, model: str, version: str) -> None:
        self.redis.delete(SetKeys(model, version).wake)

    # ---- pending users ------------------------------------------------------------------------

    def pending_users(
        self, followed: tuple[str, str], follower: tuple[str, str], *, count: int
    ) -> dict[str, int]:
        """Up to ``count`` pending users of ``follower`` in ``followed``, with their stamps."""
        key = SetKeys(*followed).pending(set_name(*follower))
        flat: list[Any] = list(self.redis.hrandfield(key, count, withvalues=True) or [])
        return {str(as_text(flat[i])): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    def ack_pending(
        self, followed: tuple[str, str], follower: tuple[str, str], pending: dict[str, int]
    ) -> None:
        if not pending:
            return
        key = SetKeys(*followed).pending(set_name(*follower))
        args = [x for user, stamp in pending.items() for x in (user, stamp)]
        self.redis.eval(_ACK_LUA, 1, key, *args)

    def has_pending(self, model: str, version: str) -> bool:
        name = set_name(model, version)
        return any(
            self.redis.hlen(SetKeys(*followed).pending(name))
            for followed in self.followed_sets(model, version)
        )

    # ---- applying changes to a follower -------------------------------------------------------

    def apply_followed(self, model: str, version: str, changes: Sequence[Change]) -> Applied:
        """Apply ``changes`` to a sealed follower in one transaction, keeping its count and
        digest as onboarding does; a change older than the user's current value is skipped, and
        each applied one is pending for the follower's own followers (a chained migration)."""
        set_keys = SetKeys(model, version)
        users = [c.user for c in changes]
        value_keys = [set_keys.value(u) for u in users]
        result = Applied(0, 0, [])

        def write(pipe: Pipeline) -> None:
            nonlocal result
            raw = pipe.hgetall(set_keys.meta)
            if not raw:
                raise NotFoundError(f"Model {model!r} has no prompt set version {version!r}.")
            meta = parse_meta(raw)
            if meta.state != SEALED:
                raise ConflictError(f"{model} version {version} is {meta.state}, not sealed.")
            # One MGET of the set's slot (redis-py's cluster pipeline refuses its mget()).
            olds = [as_bytes(v) for v in pipe.execute_command("MGET", *value_keys)]
            stamps = pipe.hmget(set_keys.stamps, users)
            followers = parse_followers(pipe.hgetall(set_keys.followers))
            digest, created, removed = meta.digest, 0, 0
            pipe.multi()
            for change, old, held in zip(changes, olds, stamps, strict=True):
                if held is not None and int(held) >= change.stamp:
                    continue  # the follower holds a newer write of this user
                pipe.hset(set_keys.stamps, change.user, change.stamp)
                if old is not None:
                    digest = codec.digest_without(digest, [(change.user, old)])
                if change.value is None:
                    removed += old is not None
                    pipe.delete(set_keys.value(change.user))
                    pipe.srem(set_keys.users, change.user)
                else:
                    created += old is None
                    digest = codec.combine_digests(
                        [digest, codec.set_digest([(change.user, change.value)])]
                    )
                    pipe.set(set_keys.value(change.user), change.value)
                    pipe.sadd(set_keys.users, change.user)
                record_pending(pipe, set_keys, followers, user=change.user, stamp=change.stamp)
            pipe.hincrby(set_keys.meta, "count", created - removed)
            pipe.hset(set_keys.meta, "digest", digest)
            result = Applied(created, removed, followers)

        self.redis.transaction(
            write, set_keys.meta, set_keys.stamps, set_keys.followers, *value_keys
        )
        return result
