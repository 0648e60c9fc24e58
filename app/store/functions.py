"""The read path as one Redis function library, and the format of its replies.

Readers run only these functions, by FCALL_RO: the library is the service's, loaded by the API
(``load_functions``) on every primary; a reader's ACL user may not load code, so it cannot
wedge Redis with a script of its own. Functions persist in the AOF/RDB and replicate, unlike the
script cache; a Redis that lost them anyway (FUNCTION FLUSH, a fresh node) gets them again from
the API on its next read.

On a single Redis the read is one call, ``pm_read``: resolve the active pointer (unless the
version is given), check that the set is sealed and GET the users' values; Redis runs a function
atomically, so a promotion (one HSET of the pointers hash) lands either before or after it, and
a set that is still being written is never read. The value keys depend on the pointer, so that
function cannot declare them. Redis Cluster refuses undeclared keys in another node's slots, so
there the read takes two calls: ``pm_resolve`` on the registry's slot, then ``pm_read_set`` with
the set's keys declared (one slot, one hash tag). A promotion between the two hands the reader
the previous version, which stays sealed and readable for the grace period: never a half-written
set. ``pm_format`` returns a sealed set's metadata (what a reader without the API's rights needs
to decode values).

A function checks every key it is handed against the model and version it is asked for, so a
caller cannot point the seal check at one set and the GETs at another key.

Reply: {0} no default model; {1, model} model has no active version; {2, model, version, state}
set missing ("") or not sealed; {3, model, version, value...}: one value per user, nil for none
(``pm_resolve``: {3, model, version}; ``pm_format``: {3, model, version, doc}). The values go
back as they are: a Lua table.concat of them costs Redis more than the GETs (bench/README.md,
"Serving"), and hiredis parses the elements in C. Key names match ``keys.SetKeys``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.exceptions import ResponseError

from app.errors import NotFoundError
from app.store.base import as_text
from app.store.connect import REDIS_DOWN
from app.store.keys import ACTIVE, DEFAULT_MODEL, SetKeys
from app.store.meta import SEALED

T = TypeVar("T")

LIBRARY_NAME = "pm"
# KEYS: the active pointers hash; ARGV: model or "", version or "", then users.
READ = "pm_read"
# KEYS: the active pointers hash; ARGV: model or "", version or "".
RESOLVE = "pm_resolve"
# KEYS: the set's meta key, then one value key per user; ARGV: model, version.
READ_SET = "pm_read_set"
# KEYS: the set's meta key; ARGV: model, version.
FORMAT = "pm_format"

LIBRARY = f"""#!lua name={LIBRARY_NAME}

local function resolve(active, model, version)
  if model == '' then
    model = redis.call('HGET', active, '{DEFAULT_MODEL}')
    if not model then return nil, nil, {{0}} end
  end
  if version == '' then
    version = redis.call('HGET', active, model)
    if not version then return nil, nil, {{1, model}} end
  end
  return model, version, nil
end

-- The set's key prefix, after checking that ``meta`` is its meta key.
local function set_prefix(meta, model, version)
  local prefix = 'pm:{{' .. model .. ':' .. version .. '}}'
  if meta ~= prefix .. ':meta' then
    error('pm: the first key must be the meta key of ' .. model .. ' version ' .. version)
  end
  return prefix
end

-- nil when the set is sealed, else the reply that says why it cannot be read.
local function refused(meta, model, version)
  local state = redis.call('HGET', meta, 'state')
  if state ~= '{SEALED}' then return {{2, model, version, state or ''}} end
  return nil
end

local function read(keys, args)
  local model, version, early = resolve(keys[1], args[1], args[2])
  if early then return early end
  local prefix = 'pm:{{' .. model .. ':' .. version .. '}}'
  local no = refused(prefix .. ':meta', model, version)
  if no then return no end
  local reply = {{3, model, version}}
  local values = prefix .. ':u:'
  for i = 3, #args do
    reply[i + 1] = redis.call('GET', values .. args[i])
  end
  return reply
end

local function resolve_only(keys, args)
  local model, version, early = resolve(keys[1], args[1], args[2])
  if early then return early end
  return {{3, model, version}}
end

local function read_set(keys, args)
  local model, version = args[1], args[2]
  local values = set_prefix(keys[1], model, version) .. ':u:'
  local no = refused(keys[1], model, version)
  if no then return no end
  local reply = {{3, model, version}}
  for i = 2, #keys do
    if string.sub(keys[i], 1, #values) ~= values then
      error('pm: key ' .. i .. ' is not a value key of ' .. model .. ' version ' .. version)
    end
    reply[i + 2] = redis.call('GET', keys[i])
  end
  return reply
end

local function format(keys, args)
  local model, version = args[1], args[2]
  set_prefix(keys[1], model, version)
  local no = refused(keys[1], model, version)
  if no then return no end
  return {{3, model, version, redis.call('HGET', keys[1], 'doc')}}
end

redis.register_function{{function_name='{READ}', callback=read, flags={{'no-writes'}}}}
redis.register_function{{function_name='{RESOLVE}', callback=resolve_only, flags={{'no-writes'}}}}
redis.register_function{{function_name='{READ_SET}', callback=read_set, flags={{'no-writes'}}}}
redis.register_function{{function_name='{FORMAT}', callback=format, flags={{'no-writes'}}}}
"""


class FunctionsNotLoaded(ResponseError):
    """The store's Redis has not got the read functions (a reader cannot load them)."""


class NoActiveVersion(NotFoundError):
    """The model has no active version: unknown, or never promoted (only the API can tell)."""

    def __init__(self, model: str) -> None:
        super().__init__(
            f"Model {model!r} has no active prompt set; register it (POST /models) if it is "
            f"new, then train one (POST /models/{model}/train) or run a migration to it."
        )
        self.model = model


def not_loaded(error: ResponseError) -> bool:
    return str(error).startswith("Function not found")


def missing_functions(error: ResponseError) -> FunctionsNotLoaded:
    return FunctionsNotLoaded(
        f"The store's Redis has no '{LIBRARY_NAME}' read functions ({error}); start the API "
        "on it (it loads them at start-up and on its next read)."
    )


def parse_reply(reply: Sequence[Any]) -> tuple[str, str, list[Any]]:
    """(model, version, the rest) of a function's reply, or the NotFoundError it stands for."""
    code = int(reply[0])
    if code == 0:
        raise NotFoundError("No model is active yet; promote a migration or activate a model.")
    model = str(as_text(reply[1]))
    if code == 1:
        raise NoActiveVersion(model)
    version = str(as_text(reply[2]))
    if code == 2:
        if not reply[3]:
            raise NotFoundError(f"Model {model!r} has no prompt set version {version!r}.")
        raise NotFoundError(f"{model} version {version} is not sealed yet; it cannot be read.")
    # A missing value is nil on RESP2 and false on RESP3.
    return model, version, [bytes(value) if value else None for value in reply[3:]]


class ReadFunctions:
    """The read functions on one asyncio client, for the API and for direct readers alike.

    FCALL_RO goes straight to the client: redis-py's wrappers cost the read path more than the
    function's own work (bench/README.md, "Serving"). ``reload`` loads the library again when a
    Redis lost it; a reader, whose ACL cannot load code, passes None and gets FunctionsNotLoaded.
    """

    def __init__(
        self, aredis: AsyncRedis | AsyncRedisCluster,
        *, reload: Callable[[], Awaitable[object]] | None,
    ) -> None:  # fmt: skip
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
        """The metadata document of a sealed set (NotFoundError if it is missing or unsealed)."""
        meta = SetKeys(model, version).meta
        reply = await self._discovered(lambda: self._call(FORMAT, [meta], [model, version]))
        _, _, (doc,) = parse_reply(reply)
        return str(as_text(doc))

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
            model, version = str(as_text(resolved[1])), str(as_text(resolved[2]))
        set_keys = SetKeys(model, version)
        values = set_keys.values
        read_keys = [set_keys.meta, *(f"{values}{user}" for user in users)]
        return await self._call(READ_SET, read_keys, (model, version))
