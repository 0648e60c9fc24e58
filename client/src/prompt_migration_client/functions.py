"""The service's read functions as a reader calls them: names, keys, replies (``direct`` extra).

The service loads the function library (its Lua is in the service's ``app/store/functions.py``)
and its API reads through :class:`ReadFunctions` as direct readers do; a reader's ACL user may
not load code. Functions: ``pm_read`` (KEYS: the active pointers hash; ARGV: model or "",
version or "", then users) resolves the pointer, checks the seal and GETs the values in one
atomic call; on Redis Cluster ``pm_resolve`` (same KEYS, ARGV: model or "", version or "") then
``pm_read_set`` (KEYS: the set's meta key, then one value key per user; ARGV: model, version);
``pm_format`` (KEYS: the set's meta key; ARGV: model, version) returns a sealed set's metadata.

Reply: {0} no default model; {1, model} model has no active version; {2, model, version, state}
set missing ("") or not sealed; {3, model, version, value...}: one value per user, nil for none
(``pm_resolve``: {3, model, version}; ``pm_format``: {3, model, version, doc}).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from prompt_migration_client.errors import NotFound

T = TypeVar("T")

LIBRARY_NAME = "pm"
READ, RESOLVE, READ_SET, FORMAT = "pm_read", "pm_resolve", "pm_read_set", "pm_format"
# The keys the functions are handed; the service's app/store/keys.py takes these from here.
ACTIVE = "pm:{registry}:active"  # hash: model -> active version, DEFAULT_MODEL -> model
DEFAULT_MODEL = "__default__"

# What an unreachable store raises: a Redis Cluster with no node answering raises
# RedisClusterException, which is not a RedisError.
REDIS_DOWN: tuple[type[Exception], ...] = (RedisError, RedisClusterException)


def set_prefix(model: str, version: str) -> str:
    """What every key of a set starts with; the hash tag keeps a set in one Cluster slot."""
    return f"pm:{{{model}:{version}}}"


def meta_key(model: str, version: str) -> str:
    return f"{set_prefix(model, version)}:meta"


def values_prefix(model: str, version: str) -> str:
    """What every value key of a set starts with: a user's value key is this and the user id."""
    return f"{set_prefix(model, version)}:u:"


def connect(url: str, *, timeout_s: float, cluster: bool = False) -> AsyncRedis | AsyncRedisCluster:
    """An asyncio client that fails fast when Redis is down and reconnects by itself later."""
    client = AsyncRedisCluster if cluster else AsyncRedis
    return client.from_url(
        url,
        retry=AsyncRetry(NoBackoff(), 1),
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
    )


class FunctionsNotLoaded(ResponseError):
    """The store's Redis has not got the read functions (a reader cannot load them)."""


class NoActiveVersion(NotFound):
    """The model has no active version: unknown, or never promoted (only the API can tell)."""

    def __init__(self, model: str) -> None:
        super().__init__(
            f"Model {model!r} has no active prompt set; register it (POST /models) if it is "
            f"new, then train one (POST /models/{model}/train) or run a migration to it.",
            status=404,
            code="not_found",
        )
        self.model = model


def not_loaded(error: ResponseError) -> bool:
    return str(error).startswith("Function not found")


def missing_functions(error: ResponseError) -> FunctionsNotLoaded:
    return FunctionsNotLoaded(
        f"The store's Redis has no '{LIBRARY_NAME}' read functions ({error}); start the API "
        "on it (it loads them at start-up and on its next read)."
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _not_found(detail: str) -> NotFound:
    return NotFound(detail, status=404, code="not_found")


def parse_reply(reply: Sequence[Any]) -> tuple[str, str, list[Any]]:
    """(model, version, the rest) of a function's reply, or the :class:`NotFound` it stands for."""
    code = int(reply[0])
    if code == 0:
        raise _not_found("No model is active yet; promote a migration or activate a model.")
    model = _text(reply[1])
    if code == 1:
        raise NoActiveVersion(model)
    version = _text(reply[2])
    if code == 2:
        if not reply[3]:
            raise _not_found(f"Model {model!r} has no prompt set version {version!r}.")
        raise _not_found(f"{model} version {version} is not sealed yet; it cannot be read.")
    # A missing value is nil on RESP2 and false on RESP3.
    return model, version, [bytes(value) if value else None for value in reply[3:]]


class ReadFunctions:
    """The read functions on one asyncio client, for the API and for direct readers alike.

    FCALL_RO goes straight to the client: redis-py's wrappers cost the read path more than the
    function's own work. ``reload`` loads the library again when a Redis lost it; a reader, whose
    ACL cannot load code, passes None and gets FunctionsNotLoaded.
    """

    def __init__(
        self,
        aredis: AsyncRedis | AsyncRedisCluster,
        *,
        reload: Callable[[], Awaitable[object]] | None,
    ) -> None:
        self.aredis = aredis
        self.cluster = isinstance(aredis, AsyncRedisCluster)
        self._reload = reload
        # Discover a Cluster's nodes before the first read and after a failed one (_discovered).
        self._rediscover = self.cluster
        self._discovery = asyncio.Lock()

    async def read(
        self, model: str | None, version: str | None, users: Sequence[str]
    ) -> tuple[str, str, list[bytes | None]]:
        """(model, version, each user's value or None) of the readable set, atomically."""
        pointer = (model or "", version or "")
        if self.cluster:
            reply = await self._discovered(lambda: self._read_in_two_steps(pointer, users))
        else:
            try:
                reply = await self.aredis.execute_command(
                    "FCALL_RO", READ, 1, ACTIVE, *pointer, *users
                )
            except ResponseError as error:
                await self._recover(error)
                reply = await self._fcall(READ, [ACTIVE], [*pointer, *users])
        return parse_reply(reply)

    async def sealed_doc(self, model: str, version: str) -> str:
        """The metadata document of a sealed set (NotFound if it is missing or unsealed)."""
        meta = meta_key(model, version)
        reply = await self._discovered(lambda: self._call(FORMAT, [meta], [model, version]))
        _, _, (doc,) = parse_reply(reply)
        return _text(doc)

    async def _recover(self, error: ResponseError) -> None:
        """Reload the library after ``error`` said it is missing; re-raise any other error."""
        if not not_loaded(error):
            raise error
        if self._reload is None:
            raise missing_functions(error) from error
        await self._reload()

    async def _call(self, function: str, keys: list[str], args: Sequence[str]) -> Any:
        try:
            return await self._fcall(function, keys, args)
        except ResponseError as error:
            await self._recover(error)
        return await self._fcall(function, keys, args)

    def _fcall(self, function: str, keys: list[str], args: Sequence[str]) -> Awaitable[Any]:
        if not self.cluster:
            return self.aredis.execute_command("FCALL_RO", function, len(keys), *keys, *args)
        # Routed here by the first key: redis-py would ask a node for FCALL_RO's keys (COMMAND
        # GETKEYS) on every call.
        assert isinstance(self.aredis, AsyncRedisCluster)
        node = self.aredis.get_node_from_key(keys[0])
        return self.aredis.execute_command(
            "FCALL_RO", function, len(keys), *keys, *args, target_nodes=node
        )

    async def _discovered(self, read: Callable[[], Awaitable[T]]) -> T:
        """``read()``; on Redis Cluster, before the first read and after a failed one the client
        discovers the nodes once, while other reads wait: redis-py (8.1) would let every
        concurrent read discover them at once, and those races drop connections still in use."""
        if not self.cluster:
            return await read()
        assert isinstance(self.aredis, AsyncRedisCluster)
        if self._rediscover:
            async with self._discovery:
                if self._rediscover:
                    await self.aredis.initialize()
                    self._rediscover = False
        try:
            return await read()
        except REDIS_DOWN:
            self._rediscover = True
            raise

    async def _read_in_two_steps(self, pointer: tuple[str, str], users: Sequence[str]) -> Any:
        reply = await self._resolve_then_read(pointer, users)
        if int(reply[0]) == 2 and not reply[3] and not pointer[1]:
            # The version the pointer named is gone: promoted away and purged between the steps.
            reply = await self._resolve_then_read(pointer, users)
        return reply

    async def _resolve_then_read(self, pointer: tuple[str, str], users: Sequence[str]) -> Any:
        """Resolve on the registry's slot unless the version is given, then read on the set's."""
        model, version = pointer
        if not (model and version):
            resolved = await self._call(RESOLVE, [ACTIVE], pointer)
            if int(resolved[0]) != 3:
                return resolved
            model, version = _text(resolved[1]), _text(resolved[2])
        values = values_prefix(model, version)
        read_keys = [meta_key(model, version), *(f"{values}{user}" for user in users)]
        return await self._call(READ_SET, read_keys, (model, version))
