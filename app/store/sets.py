"""Prompt sets and their versions: begin, write, verify and seal a set; read, onboard, erase and
delete; the path every new set takes (``write_complete_set``), imports included."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prompt_migration_client import codec
from redis.client import Pipeline

from app.errors import ConflictError, IntegrityError, NotFoundError
from app.store import keys
from app.store.base import StoreBase, as_bytes, as_text
from app.store.follow import Follower, parse_followers, record_pending, stamp_now
from app.store.keys import SetKeys
from app.store.meta import SEALED, WRITING, SetFormat, SetMeta, parse_meta


class SetsMixin(StoreBase):
    if TYPE_CHECKING:  # from RegistryMixin

        def list_models(self) -> list[dict[str, Any]]: ...
        def active_pointers(self) -> dict[str, str]: ...

    if TYPE_CHECKING:  # from ReaderAclMixin

        def sync_reader_acl(self) -> bool: ...

    if TYPE_CHECKING:  # from FollowMixin

        def unlink_follows(self, model: str, version: str) -> None: ...

    if TYPE_CHECKING:  # from BulkMixin

        def write_checked(
            self,
            model: str,
            version: str,
            users: Sequence[str],
            values: Sequence[bytes | memoryview],
        ) -> tuple[int, str]: ...
        def set_size(self, model: str, version: str) -> int: ...
        def count_values(self, model: str, version: str) -> int: ...
        def unlink_set_keys(self, model: str, version: str) -> None: ...

    def allocate_version(self, model: str) -> str:
        return str(self.redis.hincrby(keys.SEQ, model, 1))

    def begin_set(self, meta: SetMeta) -> None:
        """Create the set's metadata in state ``writing``; a resumed job finds it already there."""
        key = SetKeys(meta.model, meta.version).meta
        if self.redis.hsetnx(key, "doc", json.dumps(meta.public())):
            self.redis.hset(key, mapping={"state": WRITING, "count": 0})
            self.redis.zadd(keys.versions_key(meta.model), {meta.version: meta.created_at})

    def get_meta(self, model: str, version: str) -> SetMeta:
        raw = self.redis.hgetall(SetKeys(model, version).meta)
        if not raw:
            raise NotFoundError(f"Model {model!r} has no prompt set version {version!r}.")
        return parse_meta(raw)

    def require_version(self, model: str, version: str) -> SetMeta:
        """A set's metadata, in any state; a 404 names the registered models, or the model's
        versions, so the caller sees what exists."""
        names = [str(spec["name"]) for spec in self.list_models()]
        if model not in names:
            raise NotFoundError(
                f"Unknown model {model!r}; registered models: {names}. Register it with "
                "POST /models."
            )
        raw = self.redis.hgetall(SetKeys(model, version).meta)
        if not raw:
            versions = [str(as_text(v)) for v in self.redis.zrange(keys.versions_key(model), 0, -1)]
            active = self.active_pointers().get(model)
            raise NotFoundError(
                f"Model {model!r} has no prompt set version {version!r}; its versions: "
                f"{versions} (active: {active!r})."
            )
        return parse_meta(raw)

    def sealed_format(self, model: str, version: str) -> SetFormat | None:
        """A readable set's format (cached); None while the set is not sealed."""
        key = (model, version)
        if key not in self._sealed:
            meta = self.get_meta(model, version)
            if meta.state != SEALED:
                return None
            self._cache_sealed(meta)
        return self._sealed[key]

    def _cache_sealed(self, meta: SetMeta) -> SetFormat:
        if len(self._sealed) > 1024:
            self._sealed.clear()
        self._sealed[(meta.model, meta.version)] = meta.format()
        return self._sealed[(meta.model, meta.version)]

    def list_versions(self, model: str) -> list[SetMeta]:
        versions = self.redis.zrange(keys.versions_key(model), 0, -1)
        metas = []
        for v in versions:
            try:
                metas.append(self.get_meta(model, str(as_text(v))))
            except NotFoundError:
                continue
        return metas

    # ---- writing, verifying and sealing -------------------------------------------------------

    def write_prompts(self, model: str, version: str, items: Sequence[tuple[str, bytes]]) -> None:
        """Idempotent pipelined writes into a version namespace (a re-run overwrites)."""
        set_keys = SetKeys(model, version)
        values = set_keys.values  # a value key is this and the user id
        for start in range(0, len(items), self.write_batch):
            batch = items[start : start + self.write_batch]
            pipe = self.redis.pipeline(transaction=False)
            for user, value in batch:
                pipe.set(f"{values}{user}", value)
            pipe.sadd(set_keys.users, *[user for user, _ in batch])
            pipe.execute()

    def write_complete_set(
        self,
        meta: SetMeta,
        *,
        head: bytes,
        batches: Iterable[Sequence[tuple[str, bytes]]],
        metrics: dict[str, Any] | None = None,
    ) -> SetMeta:
        """Write a whole set into its version namespace batch by batch, each read back as it is
        written (``write_checked``), then seal it on their counts and digests: the path every new
        set takes, in memory bounded by one batch."""
        self.begin_set(meta)
        self.put_head(meta.model, meta.version, head)
        count, digests = 0, []
        for items in batches:
            written, digest = self.write_checked(
                meta.model, meta.version, [u for u, _ in items], [v for _, v in items]
            )
            count += written
            digests.append(digest)
        return self.seal_set(
            meta.model,
            meta.version,
            expected_count=count,
            expected_digest=codec.combine_digests(digests),
            metrics=metrics,
        )

    def put_head(self, model: str, version: str, head: bytes) -> None:
        self.redis.set(SetKeys(model, version).head, head)

    def get_head(self, model: str, version: str) -> bytes:
        raw = self.redis.get(SetKeys(model, version).head)
        if raw is None:
            raise NotFoundError(f"{model} version {version} has no task head stored.")
        return as_bytes(raw) or b""

    def seal_set(
        self,
        model: str,
        version: str,
        *,
        expected_count: int,
        expected_digest: str,
        metrics: dict[str, Any] | None = None,
    ) -> SetMeta:
        """Verify the set against what its writers wrote and read back (``expected_count`` and
        ``expected_digest``, added up from ``write_checked``), then mark it readable and grant it
        to the direct readers (a retried seal grants it again).

        The set must list exactly that many users, each with a value; no value is read again
        (only the erased users'), so sealing costs the ids, not the prompts.
        """
        meta = self.get_meta(model, version)
        if meta.state == SEALED:
            self.sync_reader_acl()
            return meta
        listed = self.set_size(model, version)
        stored = self.count_values(model, version) if listed == expected_count else listed
        if listed != expected_count or stored != expected_count:
            raise IntegrityError(
                f"{model} version {version}: the set lists {listed} users with {stored} stored "
                f"prompts, but its writers wrote and read back {expected_count}; a write was "
                "lost or a key removed (check Redis's maxmemory-policy: the store needs "
                "noeviction). Run the job again."
            )
        meta.metrics = metrics or meta.metrics
        self._seal_without_erased(meta, count=expected_count, digest=expected_digest)
        self.sync_reader_acl()
        return meta

    def _seal_without_erased(self, meta: SetMeta, *, count: int, digest: str) -> None:
        """Drop the users erased while the set was written, and make the set readable.

        Both happen in one transaction that watches the tombstones: an erasure landing in
        between makes it fail, and it runs again with that user dropped too. Only the erased
        users' values are read, to take them out of the digest.
        """
        set_keys = SetKeys(meta.model, meta.version)
        tombstones = set_keys.erased

        def seal(pipe: Pipeline) -> None:
            erased = [str(as_text(u)) for u in pipe.hkeys(tombstones)]
            found = [(u, as_bytes(pipe.get(set_keys.value(u)))) for u in erased]
            dropped = [(u, v) for u, v in found if v is not None]
            meta.count, meta.sealed_at = count - len(dropped), time.time()
            meta.digest = codec.digest_without(digest, dropped)
            meta.state = SEALED
            pipe.multi()
            if dropped:
                pipe.delete(*(set_keys.value(u) for u, _ in dropped))
                pipe.srem(set_keys.users, *(u for u, _ in dropped))
            pipe.delete(tombstones)
            pipe.hset(
                set_keys.meta,
                mapping={
                    "doc": json.dumps(meta.public()),
                    "count": meta.count,
                    "digest": meta.digest,
                    "state": SEALED,
                },
            )

        self.redis.transaction(seal, tombstones)

    # ---- reading (workers and the sync routes; the API's hot path is in reads.py) -------------

    def set_users(self, model: str, version: str) -> list[str]:
        key = SetKeys(model, version).users
        return sorted(str(as_text(u)) for u in self.redis.sscan_iter(key, count=1000))

    def get_prompt(self, model: str, version: str, user: str) -> bytes | None:
        raw = self.redis.get(SetKeys(model, version).value(user))
        return as_bytes(raw)

    def get_prompts(self, model: str, version: str, users: Sequence[str]) -> list[bytes | None]:
        values = SetKeys(model, version).values  # a value key is this and the user id
        out: list[bytes | None] = []
        for start in range(0, len(users), self.write_batch):
            pipe = self.redis.pipeline(transaction=False)
            for user in users[start : start + self.write_batch]:
                pipe.get(f"{values}{user}")
            out.extend(as_bytes(v) for v in pipe.execute())
        return out

    def count_keys(self, model: str, version: str) -> int:
        """Prompt keys that exist in the namespace (a SCAN; for verification, not hot paths)."""
        pattern = f"{SetKeys(model, version).values}*"
        return sum(1 for _ in self.redis.scan_iter(match=pattern, count=1000))

    # ---- changing a set: onboarding, erasure, deletion ----------------------------------------

    def onboard(self, model: str, version: str, user: str, value: bytes) -> bool:
        """Add or replace one user's prompt in a sealed set; True when the user is new."""
        return self.onboard_followed(model, version, user, value)[0]

    def onboard_followed(
        self, model: str, version: str, user: str, value: bytes
    ) -> tuple[bool, list[Follower]]:
        """``onboard``, and the set's followers, for whom the user is pending now (wake them).

        The value, the users set, the count, the digest and the followers' pending entries
        change in one transaction, so the set's count and digest always describe what it holds
        and no follower misses the write.
        """
        set_keys = SetKeys(model, version)
        meta_key, value_key = set_keys.meta, set_keys.value(user)
        created, followers = False, []

        def write(pipe: Pipeline) -> None:
            nonlocal created, followers
            raw = pipe.hgetall(meta_key)
            if not raw:
                raise NotFoundError(f"Model {model!r} has no prompt set version {version!r}.")
            meta = parse_meta(raw)
            if meta.state != SEALED:
                raise ConflictError(
                    f"{model} version {version} is {meta.state}, not sealed: "
                    "onboard users onto a readable set."
                )
            old = as_bytes(pipe.get(value_key))
            followers = parse_followers(pipe.hgetall(set_keys.followers))
            follows = bool(pipe.exists(set_keys.follows))
            digest = codec.combine_digests([meta.digest, codec.set_digest([(user, value)])])
            stamp = stamp_now()
            pipe.multi()
            pipe.set(value_key, value)
            pipe.sadd(set_keys.users, user)
            if old is None:
                pipe.hincrby(meta_key, "count", 1)
            else:
                digest = codec.digest_without(digest, [(user, old)])
            pipe.hset(meta_key, "digest", digest)
            if follows:  # a write here is newer than any pending one of the sets it follows
                pipe.hset(set_keys.stamps, user, stamp)
            record_pending(pipe, set_keys, followers, user=user, stamp=stamp)
            created = old is None

        self.redis.transaction(write, meta_key, value_key, set_keys.followers)
        return created, followers

    def erase_user(self, user: str) -> int:
        """Remove one user's prompt from every version of every model, including sets still
        being written; returns how many sets held a prompt of the user."""
        return self.erase_user_followed(user)[0]

    def erase_user_followed(self, user: str) -> tuple[int, list[Follower]]:
        """``erase_user``, and the followers of the sets that held the user (wake them)."""
        held, followers = 0, []
        for spec in self.list_models():
            for v in self.redis.zrange(keys.versions_key(spec["name"]), 0, -1):
                was_held, touched = self._erase_from_set(spec["name"], str(as_text(v)), user)
                held += was_held
                followers.extend(touched)
        return held, followers

    def _erase_from_set(self, model: str, version: str, user: str) -> tuple[bool, list[Follower]]:
        """Erase one user from one set, atomically against sealing: this watches the metadata
        that sealing writes, sealing watches the tombstones that this writes.

        A sealed set loses the user, its count and its digest at once, and its followers get
        the user as pending. A set still being written gets a tombstone instead, and sealing
        removes the user, so a chunk written after the erasure cannot bring the user back and
        the written set still verifies.
        """
        set_keys = SetKeys(model, version)
        meta_key, value_key = set_keys.meta, set_keys.value(user)
        held, followers = False, []

        def erase(pipe: Pipeline) -> None:
            nonlocal held, followers
            raw = pipe.hgetall(meta_key)
            meta = parse_meta(raw) if raw else None
            old = as_bytes(pipe.get(value_key))
            followers = parse_followers(pipe.hgetall(set_keys.followers)) if old else []
            held = old is not None
            pipe.multi()
            if meta is not None and meta.state == WRITING:
                pipe.hset(set_keys.erased, user, 1)
                return
            if old is None:
                return
            pipe.delete(value_key)
            pipe.srem(set_keys.users, user)
            record_pending(pipe, set_keys, followers, user=user, stamp=stamp_now())
            if meta is not None:
                pipe.hincrby(meta_key, "count", -1)
                pipe.hset(meta_key, "digest", codec.digest_without(meta.digest, [(user, old)]))

        self.redis.transaction(erase, meta_key, value_key, set_keys.followers)
        return held, followers

    def delete_set(self, model: str, version: str) -> None:
        set_keys = SetKeys(model, version)
        if self.active_pointers().get(model) == version:
            raise ConflictError(f"{model} version {version} is active; activate another first.")
        # The metadata goes first: from then on readers find no set, never a set missing users;
        # then the direct readers lose their grants on it, before its values go.
        self.redis.unlink(set_keys.meta)
        self.sync_reader_acl()
        self.unlink_follows(model, version)
        self.unlink_set_keys(model, version)
        self.redis.zrem(keys.versions_key(model), version)
