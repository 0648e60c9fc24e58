"""What every part of the store shares: its clients and settings, and how Redis replies decode."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

if TYPE_CHECKING:
    from app.store.meta import SetFormat


class StoreBase:
    """The state of a :class:`app.store.Store`, which each part of it (a mixin per concept) uses."""

    redis: Redis | RedisCluster
    write_batch: int
    _sealed: dict[tuple[str, str], SetFormat]  # sealed sets' formats, which never change
    aredis: AsyncRedis | AsyncRedisCluster | None
    reader_acl_users: tuple[str, ...]  # direct readers' ACL users whose grants the store keeps


def as_bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    return value.encode() if isinstance(value, str) else bytes(value)


def as_text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
