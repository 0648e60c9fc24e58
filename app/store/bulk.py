"""A set's values in bulk: a few thousand keys per round trip, and sets listed in batches, so a
job's memory is bounded by one batch and not by the set's size.

Every key a call names shares the set's hash tag, so MGET, MSET and EXISTS stay single-slot on
Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prompt_migration_client import codec
from redis.cluster import RedisCluster

from app.errors import IntegrityError
from app.store.base import StoreBase, as_bytes, as_text
from app.store.keys import SetKeys

# Values per MGET/MSET. Redis runs one command at a time, so a read that arrives behind one waits
# for all of it: 100 values of a few KB (about 250 KB) keep that wait near a fifth of a
# millisecond, for 5 to 10% of the chunk path's rate against 500 (bench/README.md).
BULK_VALUES = 100
# Keys per command that moves ids alone (SMISMEMBER, EXISTS, UNLINK, SSCAN's count): no one
# command holds Redis for long.
BULK_KEYS = 1000


class BulkMixin(StoreBase):
    def read_values(self, model: str, version: str, users: Sequence[str]) -> list[bytes | None]:
        """The users' stored values, in order (None where a user has none), by MGET."""
        prefix = SetKeys(model, version).values
        out: list[bytes | None] = []
        for start in range(0, len(users), BULK_VALUES):
            keys = [prefix + user for user in users[start : start + BULK_VALUES]]
            out.extend(as_bytes(v) for v in self.redis.mget(keys))
        return out

    def write_checked(
        self, model: str, version: str, users: Sequence[str], values: Sequence[bytes | memoryview]
    ) -> tuple[int, str]:
        """Write the values (and list the users), read them back, and return their count and set
        digest: what sealing later adds up instead of reading the whole set again."""
        set_keys = SetKeys(model, version)
        prefix = set_keys.values
        for start in range(0, len(users), BULK_VALUES):
            batch = users[start : start + BULK_VALUES]
            keys = [prefix + user for user in batch]
            mapping = dict(zip(keys, values[start : start + BULK_VALUES], strict=True))
            if isinstance(self.redis, RedisCluster):  # its pipeline refuses multi-key commands
                self.redis.mset(mapping)
                self.redis.sadd(set_keys.users, *batch)
            else:  # one round trip for both
                pipe = self.redis.pipeline(transaction=False)
                pipe.mset(mapping)
                pipe.sadd(set_keys.users, *batch)
                pipe.execute()
        back = self.read_values(model, version, users)
        if not values_match(back, values):
            at = next(i for i, (b, v) in enumerate(zip(back, values, strict=True)) if b != v)
            raise IntegrityError(
                f"{model} version {version}: user {users[at]!r}'s value read back "
                f"{'missing' if back[at] is None else 'different'} right after it was written; "
                "another writer or an eviction changed the set (check Redis's maxmemory-policy: "
                "the store needs noeviction)."
            )
        return len(users), codec.set_digest(zip(users, values, strict=True))

    def scan_users(
        self, model: str, version: str, *, count: int = BULK_KEYS
    ) -> Iterator[list[str]]:
        """The set's users, a batch at a time (SSCAN: a user may come twice while the set grows,
        and every user listed throughout comes at least once)."""
        key = SetKeys(model, version).users
        cursor = 0
        while True:
            cursor, batch = self.redis.sscan(key, cursor, count=count)
            cursor = int(cursor)
            if batch:
                yield [str(as_text(u)) for u in batch]
            if cursor == 0:
                return

    def in_set(self, model: str, version: str, users: Sequence[str]) -> list[bool]:
        """Whether each user is listed in the set (SMISMEMBER, a batch at a time)."""
        key = SetKeys(model, version).users
        out: list[bool] = []
        for start in range(0, len(users), BULK_KEYS):
            out.extend(
                bool(m) for m in self.redis.smismember(key, list(users[start : start + BULK_KEYS]))
            )
        return out

    def set_size(self, model: str, version: str) -> int:
        return int(self.redis.scard(SetKeys(model, version).users))

    def count_values(self, model: str, version: str) -> int:
        """How many of the set's listed users have a value key (EXISTS: no value is read)."""
        prefix = SetKeys(model, version).values
        found = 0
        for batch in self.scan_users(model, version, count=BULK_KEYS):
            found += int(self.redis.exists(*(prefix + user for user in batch)))
        return found

    def unlink_set_keys(self, model: str, version: str) -> None:
        """Every key of the set, ``BULK_KEYS`` at a time by SCAN and UNLINK: Redis frees large
        values off its main thread, and no one call holds it long, so reads go on meanwhile."""
        batch: list[str] = []
        for key in self.redis.scan_iter(match=SetKeys(model, version).pattern, count=BULK_KEYS):
            batch.append(str(as_text(key)))
            if len(batch) >= BULK_KEYS:
                self.redis.unlink(*batch)
                batch = []
        if batch:
            self.redis.unlink(*batch)


def values_match(back: Sequence[bytes | None], written: Sequence[bytes | memoryview]) -> bool:
    """Whether every value read back equals the one written: one comparison of the joined bytes
    and of the lengths (comparing bytes to a memoryview goes byte by byte through Python's
    generic buffer comparison)."""
    present = [b for b in back if b is not None]
    if len(present) != len(written):
        return False
    if [len(b) for b in present] != [len(v) for v in written]:
        return False
    return b"".join(present) == b"".join(written)
