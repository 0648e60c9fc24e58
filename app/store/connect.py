"""Clients of the store's Redis, with the fail-fast policy, and what an unreachable store raises."""

from __future__ import annotations

from typing import Any

# What an unreachable store raises: the client's definition, which its direct reader uses too.
from prompt_migration_client.functions import REDIS_DOWN as REDIS_DOWN
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.retry import Retry


def _fail_fast(timeout_s: float) -> dict[str, Any]:
    # Fail fast when Redis is down (callers answer 503) and reconnect by itself later.
    return {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "health_check_interval": 30,
    }


def connect_redis(url: str, *, timeout_s: float, cluster: bool = False) -> Redis | RedisCluster:
    """A client for ``url``; with ``cluster``, for the Redis Cluster that ``url`` is a node of.

    A Cluster client discovers the nodes at once, so the Cluster must answer now; a single
    Redis is connected to on first use.
    """
    options = {"retry": Retry(NoBackoff(), 1), **_fail_fast(timeout_s)}
    if not cluster:
        return Redis.from_url(url, **options)
    try:
        return RedisCluster.from_url(url, **options)
    except RedisClusterException as exc:
        raise RedisConnectionError(
            f"No node of the Redis Cluster at {url} answered ({exc}); start it or fix "
            "PM_REDIS_URL, then start again."
        ) from exc


def connect_redis_async(
    url: str, *, timeout_s: float, cluster: bool = False
) -> AsyncRedis | AsyncRedisCluster:
    """The asyncio client of the API's read path, with the same fail-fast policy."""
    client = AsyncRedisCluster if cluster else AsyncRedis
    return client.from_url(url, retry=AsyncRetry(NoBackoff(), 1), **_fail_fast(timeout_s))
