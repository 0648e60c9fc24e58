"""The Redis store: the only code that knows key names (``app/store/keys.py`` lists the layout).

One :class:`Store` holds the clients; its methods come from a module per concept:

- ``keys.py``      every key name and hash tag, and the names that go into keys
- ``connect.py``   clients with the fail-fast policy, and ``REDIS_DOWN``
- ``meta.py``      a set's metadata (``SetMeta``), its states, and ``SetFormat``
- ``registry.py``  models, datasets, active pointers, activation and purging retired versions
- ``sets.py``      prompt sets and versions: begin, write, verify, seal, onboard, erase, delete
- ``bulk.py``      a set's values in bulk: MGET/MSET batches, writes read back, SSCAN batches
- ``functions.py`` the read path's Redis functions, their reply format, and how they are called
- ``reads.py``     the API's asyncio read path that runs them
- ``follow.py``    a migration's target following its sources: pending users, applying them
- ``jobs.py``      job records, idempotency, chunks, leases and counters
- ``plans.py``     a migration's plan, stored and read chunk by chunk
- ``reader_acl.py`` direct readers' grants: the keys of the readable sets, and no others
"""

from __future__ import annotations

from collections.abc import Sequence

from prompt_migration_client.functions import ReadFunctions
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from app.store.bulk import BulkMixin
from app.store.connect import REDIS_DOWN, connect_redis, connect_redis_async
from app.store.follow import Applied, Change, Follower, FollowMixin
from app.store.jobs import JobsMixin
from app.store.keys import MODEL_NAME_PATTERN, USER_ID_PATTERN, validate_user_id
from app.store.meta import SEALED, WRITING, SetFormat, SetMeta
from app.store.plans import PlansMixin
from app.store.reader_acl import ReaderAclMixin
from app.store.reads import ReadsMixin
from app.store.registry import Activation, RegistryMixin
from app.store.sets import SetsMixin

__all__ = [
    "MODEL_NAME_PATTERN",
    "REDIS_DOWN",
    "SEALED",
    "USER_ID_PATTERN",
    "WRITING",
    "Activation",
    "Applied",
    "Change",
    "Follower",
    "SetFormat",
    "SetMeta",
    "Store",
    "connect_redis",
    "connect_redis_async",
    "validate_user_id",
]


class Store(
    RegistryMixin,
    SetsMixin,
    BulkMixin,
    FollowMixin,
    ReadsMixin,
    JobsMixin,
    PlansMixin,
    ReaderAclMixin,
):
    def __init__(
        self,
        redis: Redis | RedisCluster,
        *,
        write_batch: int = 500,
        aredis: AsyncRedis | AsyncRedisCluster | None = None,
        reader_acl_users: Sequence[str] = (),
    ) -> None:
        self.redis = redis
        self.write_batch = write_batch
        self.reader_acl_users = tuple(reader_acl_users)
        self._sealed = {}
        self.aredis = aredis  # the API's asyncio client (read hot path); None in workers
        if aredis is not None:
            self._reads = ReadFunctions(aredis, reload=self.aload_functions)
