"""The Redis store: the only module that knows key names.

Layout (every group shares a hash tag, so the store works on Redis Cluster):

- ``pm:{registry}:models``          hash  model name -> JSON spec
- ``pm:{registry}:active``          hash  model -> active version, ``__default__`` -> model;
                                    one HSET switches what readers get, atomically
- ``pm:{registry}:versions:<model>`` zset  version -> created time
- ``pm:{registry}:seq``             hash  model -> last allocated version number
- ``pm:{registry}:datasets``        hash  dataset name -> JSON spec
- ``pm:{registry}:retired``         zset  "model/version" -> purge-after time
- ``pm:{<model>:<version>}:meta``   hash  doc (JSON: shape, dtype, task, lineage, ...), state, and
                                    the set's current count and digest (onboarding and erasure
                                    keep both up to date)
- ``pm:{<model>:<version>}:head``   task head, safetensors bytes
- ``pm:{<model>:<version>}:users``  set   user ids
- ``pm:{<model>:<version>}:u:<user>`` raw little-endian prompt bytes
- ``pm:{<model>:<version>}:erased`` hash  users erased while the set was being written
- ``pm:{job:<id>}``                 hash  job record, one JSON value per field
- ``pm:{job:<id>}:chunks``          hash  chunk index -> JSON {count, digest} once written
- ``pm:{job:<id>}:blob:<name>``     bytes (the trained adapter, the selected users)
- ``pm:{job:<id>}:lease:<stage>``   string the holder of a running stage, with a TTL it renews
- ``pm:{job:<id>}:counters``        hash  counter -> int (stage runs, deliveries that waited)
- ``pm:{jobs}:index``               zset  job id -> created time
- ``pm:{workers}:busy:<host>``      string a stage's lease holder on that host, with the lease's TTL
- ``pm:{jobs}:idem:<key>``          string job id (+ request hash) for Idempotency-Key
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
from redis.retry import Retry

from app import codec
from app.errors import ConflictError, IntegrityError, InvalidInputError, NotFoundError

_REG = "pm:{registry}"
_DEFAULT = "__default__"
WRITING, SEALED = "writing", "sealed"


def _set_prefix(model: str, version: str) -> str:
    return f"pm:{{{model}:{version}}}"


def _job_key(job_id: str) -> str:
    return f"pm:{{job:{job_id}}}"


def _bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    return value.encode() if isinstance(value, str) else bytes(value)


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class SetMeta:
    model: str
    version: str
    task: str
    shape: list[int]  # [prompt_length, hidden_size] of one user's prompt
    dtype: str = "float32"
    template: str = ""
    lineage: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    state: str = WRITING
    count: int = 0
    digest: str = ""
    sealed_at: float | None = None

    def public(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> SetFormat:
        return SetFormat(self.model, self.version, list(self.shape), self.dtype)


@dataclass(frozen=True)
class SetFormat:
    """What a reader needs of a sealed set: none of it changes once sealed, unlike the set's count
    and digest, which onboarding and erasure keep current, so readers may cache it."""

    model: str
    version: str
    shape: list[int]
    dtype: str


def _fail_fast(timeout_s: float) -> dict[str, Any]:
    # Fail fast when Redis is down (callers answer 503) and reconnect by itself later.
    return {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "health_check_interval": 30,
    }


# What an unreachable store raises: a Redis Cluster with no node answering raises
# RedisClusterException, which is not a RedisError.
REDIS_DOWN: tuple[type[Exception], ...] = (RedisError, RedisClusterException)


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


# The read path. On a single Redis it is one script and one round trip: resolve the active
# pointer (unless the version is given), check that the set is sealed and GET the users' values;
# Redis runs a script atomically, so a promotion (one HSET of the pointers hash) lands either
# before or after it, and a set that is still being written is never read. The value keys depend
# on the pointer, so that script cannot declare them. Redis Cluster refuses undeclared keys in
# another node's slots, so there the read takes two scripts: _RESOLVE_LUA on the registry's slot,
# then _READ_SET_LUA with the set's keys declared (one slot, one hash tag). A promotion between
# the two hands the reader the previous version, which stays sealed and readable for the grace
# period: never a half-written set.
# ARGV: model or "", version or "", then users (the one-script read) or nothing.
# Reply: {0} no default model; {1, model} model has no active version; {2, model, version, state}
# set missing ("") or not sealed; {3, model, version, value...}: one value per user, nil for none.
# The values go back as they are: a Lua table.concat of them costs Redis more than the GETs
# (bench/README.md, "Serving"), and hiredis parses the elements in C.
# _RESOLVE_LUA replies {3, model, version} when the pointer resolves. Key names match
# _set_prefix().
_RESOLVE_FRAGMENT = f"""
local model = ARGV[1]
if model == '' then
  model = redis.call('HGET', KEYS[1], '{_DEFAULT}')
  if not model then return {{0}} end
end
local version = ARGV[2]
if version == '' then
  version = redis.call('HGET', KEYS[1], model)
  if not version then return {{1, model}} end
end
"""


def _read_set_fragment(*, meta_key: str, value_key: str, first: int, last: str) -> str:
    """Lua that checks the set is sealed and replies the values of ``value_key`` for ``i`` in
    ``first..last`` (see the reply above)."""
    return f"""
local state = redis.call('HGET', {meta_key}, 'state')
if state ~= '{SEALED}' then return {{2, model, version, state or ''}} end
local reply = {{3, model, version}}
for i = {first}, {last} do
  reply[4 + i - {first}] = redis.call('GET', {value_key})
end
return reply
"""


_READ_LUA = (
    _RESOLVE_FRAGMENT
    + "local prefix = 'pm:{' .. model .. ':' .. version .. '}'\n"
    + _read_set_fragment(meta_key="prefix .. ':meta'", value_key="prefix .. ':u:' .. ARGV[i]",
                         first=3, last="#ARGV")
)  # fmt: skip
_RESOLVE_LUA = _RESOLVE_FRAGMENT + "return {3, model, version}\n"
# KEYS: the set's meta key, then one value key per user; ARGV: model, version.
_READ_SET_LUA = "local model, version = ARGV[1], ARGV[2]\n" + _read_set_fragment(
    meta_key="KEYS[1]", value_key="KEYS[i]", first=2, last="#KEYS"
)


class Store:
    def __init__(
        self, redis: Redis | RedisCluster, *, write_batch: int = 500,
        aredis: AsyncRedis | AsyncRedisCluster | None = None,
    ) -> None:  # fmt: skip
        self.redis = redis
        self.write_batch = write_batch
        self._sealed: dict[tuple[str, str], SetFormat] = {}
        self.aredis = aredis  # the API's asyncio client (read hot path); None in workers
        self._cluster = isinstance(aredis, AsyncRedisCluster)
        # Discover a Cluster's nodes before the first read and after a failed one (see
        # _read_on_cluster).
        self._rediscover = self._cluster
        self._discovery = asyncio.Lock()
        if aredis is not None:
            self._read_script = aredis.register_script(_READ_LUA)
            self._resolve_script = aredis.register_script(_RESOLVE_LUA)
            self._read_set_script = aredis.register_script(_READ_SET_LUA)

    def ping(self) -> bool:
        return bool(self.redis.ping())

    # ---- models -------------------------------------------------------------------------------

    def put_model(self, name: str, spec: dict[str, Any]) -> None:
        self.redis.hset(f"{_REG}:models", name, json.dumps(spec))

    def get_model(self, name: str) -> dict[str, Any]:
        raw = self.redis.hget(f"{_REG}:models", name)
        if raw is None:
            raise NotFoundError(f"Unknown model {name!r}; register it first with POST /models.")
        return dict(json.loads(raw))

    def list_models(self) -> list[dict[str, Any]]:
        raw = self.redis.hgetall(f"{_REG}:models")
        return [json.loads(v) for _, v in sorted(raw.items())]

    def active_pointers(self) -> dict[str, str]:
        raw = self.redis.hgetall(f"{_REG}:active")
        return {str(_text(k)): str(_text(v)) for k, v in raw.items()}

    def resolve(self, model: str | None, version: str | None = None) -> tuple[str, str]:
        """(model, version) that readers get: the active version, the default model if none."""
        if model is not None and version is not None:
            return model, version
        pointers = self.active_pointers()  # one HGETALL: a consistent view during a switch
        model = model or pointers.get(_DEFAULT)
        if model is None:
            raise NotFoundError("No model is active yet; promote a migration or activate a model.")
        if model not in pointers:
            self.get_model(model)  # unknown model -> 404 that says how to register it
            raise NotFoundError(
                f"Model {model!r} has no active prompt set; train one (POST /models/{model}/train)"
                " or run a migration to it."
            )
        return model, pointers[model]

    def activate(self, model: str, version: str, *, make_default: bool = True) -> str | None:
        """Switch the model's active set in one atomic write; returns the previous version."""
        meta = self.get_meta(model, version)
        if meta.state != SEALED:
            raise ConflictError(
                f"{model} version {version} is still being written; only sealed sets can be "
                "activated. Wait for its job to finish."
            )
        previous = self.active_pointers().get(model)
        mapping: dict[Any, Any] = {model: version}
        if make_default:
            mapping[_DEFAULT] = model
        self.redis.hset(f"{_REG}:active", mapping=mapping)
        if previous and previous != version:
            self.redis.zadd(f"{_REG}:retired", {f"{model}/{previous}": time.time()})
        self.redis.zrem(f"{_REG}:retired", f"{model}/{version}")
        return previous

    def purge_retired(self, *, grace_s: float) -> list[str]:
        """Delete versions retired more than ``grace_s`` ago and not active again since."""
        cutoff = time.time() - grace_s
        due = [str(_text(m)) for m in self.redis.zrangebyscore(f"{_REG}:retired", 0, cutoff)]
        active = self.active_pointers()
        purged = []
        for item in due:
            model, version = item.split("/", 1)
            if active.get(model) != version:
                self.delete_set(model, version)
                purged.append(item)
            self.redis.zrem(f"{_REG}:retired", item)
        return purged

    # ---- datasets -----------------------------------------------------------------------------

    def put_dataset(self, name: str, spec: dict[str, Any]) -> None:
        self.redis.hset(f"{_REG}:datasets", name, json.dumps(spec))

    def get_dataset(self, name: str) -> dict[str, Any] | None:
        raw = self.redis.hget(f"{_REG}:datasets", name)
        return None if raw is None else dict(json.loads(raw))

    def list_datasets(self) -> list[dict[str, Any]]:
        return [json.loads(v) for _, v in sorted(self.redis.hgetall(f"{_REG}:datasets").items())]

    # ---- prompt sets --------------------------------------------------------------------------

    def allocate_version(self, model: str) -> str:
        return str(self.redis.hincrby(f"{_REG}:seq", model, 1))

    def begin_set(self, meta: SetMeta) -> None:
        """Create the set's metadata in state ``writing``; a resumed job finds it already there."""
        key = f"{_set_prefix(meta.model, meta.version)}:meta"
        if self.redis.hsetnx(key, "doc", json.dumps(meta.public())):
            self.redis.hset(key, mapping={"state": WRITING, "count": 0})
            self.redis.zadd(f"{_REG}:versions:{meta.model}", {meta.version: meta.created_at})

    def get_meta(self, model: str, version: str) -> SetMeta:
        raw = self.redis.hgetall(f"{_set_prefix(model, version)}:meta")
        if not raw:
            raise NotFoundError(f"Model {model!r} has no prompt set version {version!r}.")
        return _parse_meta(raw)

    def require_version(self, model: str, version: str) -> SetMeta:
        """A set's metadata, in any state; a 404 names the registered models, or the model's
        versions, so the caller sees what exists."""
        names = [str(spec["name"]) for spec in self.list_models()]
        if model not in names:
            raise NotFoundError(
                f"Unknown model {model!r}; registered models: {names}. Register it with "
                "POST /models."
            )
        raw = self.redis.hgetall(f"{_set_prefix(model, version)}:meta")
        if not raw:
            versions = [str(_text(v)) for v in self.redis.zrange(f"{_REG}:versions:{model}", 0, -1)]
            active = self.active_pointers().get(model)
            raise NotFoundError(
                f"Model {model!r} has no prompt set version {version!r}; its versions: "
                f"{versions} (active: {active!r})."
            )
        return _parse_meta(raw)

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

    # ---- the asyncio read path (API) ----------------------------------------------------------

    async def read_prompts(
        self, model: str | None, version: str | None, users: Sequence[str]
    ) -> tuple[SetFormat, list[bytes | None]]:
        """The readable set readers get and the users' values in it, in one atomic round trip.

        Same rules as resolve() + sealed_format() + get_prompts(): the active version of the model
        (the default model if none) unless ``version`` is given; only sealed sets are readable.
        """
        if self.aredis is None:
            raise RuntimeError("Store was built without an asyncio client")
        pointer = [model or "", version or ""]
        if self._cluster:
            reply = await self._read_on_cluster(pointer, users)
        else:
            reply = await self._evalsha(self._read_script, keys=[f"{_REG}:active"],
                                        args=[*pointer, *users])  # fmt: skip
        code = int(reply[0])
        if code == 0:
            raise NotFoundError("No model is active yet; promote a migration or activate a model.")
        found_model = str(_text(reply[1]))
        if code == 1:
            if not await self.aredis.hexists(f"{_REG}:models", found_model):
                raise NotFoundError(
                    f"Unknown model {found_model!r}; register it first with POST /models."
                )
            raise NotFoundError(
                f"Model {found_model!r} has no active prompt set; train one (POST /models/"
                f"{found_model}/train) or run a migration to it."
            )
        found_version = str(_text(reply[2]))
        if code == 2:
            if not reply[3]:
                raise NotFoundError(
                    f"Model {found_model!r} has no prompt set version {found_version!r}."
                )
            raise NotFoundError(
                f"{found_model} version {found_version} is not sealed yet; it cannot be read."
            )
        found = self._sealed.get((found_model, found_version))
        if found is None:
            meta = await self._aget_meta(found_model, found_version)
            # The script saw the set sealed, and sealing is final.
            found = self._cache_sealed(meta) if meta.state == SEALED else meta.format()
        # A missing value is nil on RESP2 and false on RESP3.
        return found, [bytes(value) if value else None for value in reply[3:]]

    async def _evalsha(self, script: AsyncScript, *, keys: list[str], args: list[str]) -> Any:
        """The script by EVALSHA, straight on the client: redis-py's Script wrapper costs the
        read path more than the script's own work (bench/README.md, "Serving"). A Redis that lost
        its script cache (a restart) gets the script again through the wrapper."""
        assert self.aredis is not None
        try:
            return await self.aredis.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await script(keys=keys, args=args)

    async def _read_on_cluster(self, pointer: list[str], users: Sequence[str]) -> list[Any]:
        """The read script's reply, on Redis Cluster (see _READ_LUA). Before the first read and
        after a failed one the client discovers the nodes once, while other reads wait: redis-py
        (8.1) would let every concurrent read discover them at once, and those races drop
        connections still in use."""
        await self._discover_once()
        try:
            return await self._read_in_two_steps(pointer, users)
        except REDIS_DOWN:
            self._rediscover = True
            raise

    async def _discover_once(self) -> None:
        assert self.aredis is not None
        if self._rediscover:
            async with self._discovery:
                if self._rediscover:
                    await self.aredis.initialize()
                    self._rediscover = False

    async def _read_in_two_steps(self, pointer: list[str], users: Sequence[str]) -> list[Any]:
        reply = await self._resolve_then_read(pointer, users)
        if int(reply[0]) == 2 and not reply[3] and not pointer[1]:
            # The version the pointer named is gone: promoted away and purged between the steps.
            reply = await self._resolve_then_read(pointer, users)
        return reply

    async def _resolve_then_read(self, pointer: list[str], users: Sequence[str]) -> list[Any]:
        """Resolve on the registry's slot unless the version is given, then read on the set's."""
        model, version = pointer
        if not (model and version):
            resolved = await self._evalsha(
                self._resolve_script, keys=[f"{_REG}:active"], args=pointer
            )
            if int(resolved[0]) != 3:
                return list(resolved)
            model, version = str(_text(resolved[1])), str(_text(resolved[2]))
        prefix = _set_prefix(model, version)
        keys = [f"{prefix}:meta", *(f"{prefix}:u:{user}" for user in users)]
        return list(await self._evalsha(self._read_set_script, keys=keys, args=[model, version]))

    async def aget_prompt(self, model: str, version: str, user: str) -> bytes | None:
        """One plain GET of a user's value, without the read script's pointer and seal checks
        (what a direct reader that pinned a sealed version may use)."""
        if self.aredis is None:
            raise RuntimeError("Store was built without an asyncio client")
        if not self._cluster:
            return _bytes(await self.aredis.get(f"{_set_prefix(model, version)}:u:{user}"))
        await self._discover_once()  # as _read_on_cluster does, for the same race
        try:
            return _bytes(await self.aredis.get(f"{_set_prefix(model, version)}:u:{user}"))
        except REDIS_DOWN:
            self._rediscover = True
            raise

    async def _aget_meta(self, model: str, version: str) -> SetMeta:
        assert self.aredis is not None
        raw = await self.aredis.hgetall(f"{_set_prefix(model, version)}:meta")
        if not raw:
            raise NotFoundError(f"Model {model!r} has no prompt set version {version!r}.")
        return _parse_meta(raw)

    def list_versions(self, model: str) -> list[SetMeta]:
        versions = self.redis.zrange(f"{_REG}:versions:{model}", 0, -1)
        metas = []
        for v in versions:
            try:
                metas.append(self.get_meta(model, str(_text(v))))
            except NotFoundError:
                continue
        return metas

    def write_prompts(self, model: str, version: str, items: Sequence[tuple[str, bytes]]) -> None:
        """Idempotent pipelined writes into a version namespace (a re-run overwrites)."""
        prefix = _set_prefix(model, version)
        for start in range(0, len(items), self.write_batch):
            batch = items[start : start + self.write_batch]
            pipe = self.redis.pipeline(transaction=False)
            for user, value in batch:
                pipe.set(f"{prefix}:u:{user}", value)
            pipe.sadd(f"{prefix}:users", *[user for user, _ in batch])
            pipe.execute()

    def write_complete_set(
        self, meta: SetMeta, *, head: bytes, batches: Iterable[Sequence[tuple[str, bytes]]],
        metrics: dict[str, Any] | None = None,
    ) -> SetMeta:  # fmt: skip
        """Write a whole set into its version namespace batch by batch, then read it back,
        verify count and digest, and seal it: the path every new set takes."""
        self.begin_set(meta)
        self.put_head(meta.model, meta.version, head)
        count, digests = 0, []
        for items in batches:
            self.write_prompts(meta.model, meta.version, items)
            count += len(items)
            digests.append(codec.set_digest(items))
        return self.seal_set(
            meta.model, meta.version, expected_count=count,
            expected_digest=codec.combine_digests(digests), metrics=metrics,
        )  # fmt: skip

    def put_head(self, model: str, version: str, head: bytes) -> None:
        self.redis.set(f"{_set_prefix(model, version)}:head", head)

    def get_head(self, model: str, version: str) -> bytes:
        raw = self.redis.get(f"{_set_prefix(model, version)}:head")
        if raw is None:
            raise NotFoundError(f"{model} version {version} has no task head stored.")
        return _bytes(raw) or b""

    def seal_set(
        self,
        model: str,
        version: str,
        *,
        expected_count: int,
        expected_digest: str,
        metrics: dict[str, Any] | None = None,
    ) -> SetMeta:
        """Read everything back, verify count and digest, then mark the set readable."""
        meta = self.get_meta(model, version)
        if meta.state == SEALED:
            return meta
        users = self.set_users(model, version)
        values = self.get_prompts(model, version, users)
        items = [(u, v) for u, v in zip(users, values, strict=True) if v is not None]
        digest = codec.set_digest(items)
        if len(items) != expected_count or digest != expected_digest:
            raise IntegrityError(
                f"{model} version {version}: read back {len(items)} prompts with digest "
                f"{digest[:12]}, expected {expected_count} with {expected_digest[:12]}."
            )
        meta.metrics = metrics or meta.metrics
        self._seal_without_erased(meta, items, digest=digest)
        return meta

    def _seal_without_erased(
        self, meta: SetMeta, items: list[tuple[str, bytes]], *, digest: str
    ) -> None:
        """Drop the users erased while the set was written, and make the set readable.

        Both happen in one transaction that watches the tombstones: an erasure landing in
        between makes it fail, and it runs again with that user dropped too.
        """
        prefix = _set_prefix(meta.model, meta.version)
        tombstones = f"{prefix}:erased"

        def seal(pipe: Pipeline) -> None:
            erased = {str(_text(u)) for u in pipe.hkeys(tombstones)}
            dropped = [(u, v) for u, v in items if u in erased]
            meta.count, meta.sealed_at = len(items) - len(dropped), time.time()
            meta.digest = codec.digest_without(digest, dropped)
            meta.state = SEALED
            pipe.multi()
            if dropped:
                pipe.delete(*(f"{prefix}:u:{u}" for u, _ in dropped))
                pipe.srem(f"{prefix}:users", *(u for u, _ in dropped))
            pipe.delete(tombstones)
            pipe.hset(f"{prefix}:meta", mapping={
                "doc": json.dumps(meta.public()), "count": meta.count,
                "digest": meta.digest, "state": SEALED,
            })  # fmt: skip

        self.redis.transaction(seal, tombstones)

    def update_metrics(self, model: str, version: str, metrics: dict[str, Any]) -> None:
        meta = self.get_meta(model, version)
        meta.metrics = metrics
        self.redis.hset(f"{_set_prefix(model, version)}:meta", "doc", json.dumps(meta.public()))

    def set_users(self, model: str, version: str) -> list[str]:
        key = f"{_set_prefix(model, version)}:users"
        return sorted(str(_text(u)) for u in self.redis.sscan_iter(key, count=1000))

    def get_prompt(self, model: str, version: str, user: str) -> bytes | None:
        raw = self.redis.get(f"{_set_prefix(model, version)}:u:{user}")
        return _bytes(raw)

    def get_prompts(self, model: str, version: str, users: Sequence[str]) -> list[bytes | None]:
        prefix = _set_prefix(model, version)
        out: list[bytes | None] = []
        for start in range(0, len(users), self.write_batch):
            pipe = self.redis.pipeline(transaction=False)
            for user in users[start : start + self.write_batch]:
                pipe.get(f"{prefix}:u:{user}")
            out.extend(_bytes(v) for v in pipe.execute())
        return out

    def count_keys(self, model: str, version: str) -> int:
        """Prompt keys that exist in the namespace (a SCAN; for verification, not hot paths)."""
        pattern = f"{_set_prefix(model, version)}:u:*"
        return sum(1 for _ in self.redis.scan_iter(match=pattern, count=1000))

    def onboard(self, model: str, version: str, user: str, value: bytes) -> bool:
        """Add or replace one user's prompt in a sealed set; True when the user is new.

        The value, the users set, the count and the digest change in one transaction, so the
        set's count and digest always describe what it holds.
        """
        prefix = _set_prefix(model, version)
        meta_key, value_key = f"{prefix}:meta", f"{prefix}:u:{user}"
        created = False

        def write(pipe: Pipeline) -> None:
            nonlocal created
            raw = pipe.hgetall(meta_key)
            if not raw:
                raise NotFoundError(f"Model {model!r} has no prompt set version {version!r}.")
            meta = _parse_meta(raw)
            if meta.state != SEALED:
                raise ConflictError(f"{model} version {version} is {meta.state}, not sealed: "
                                    "onboard users onto a readable set.")  # fmt: skip
            old = _bytes(pipe.get(value_key))
            digest = codec.combine_digests([meta.digest, codec.set_digest([(user, value)])])
            pipe.multi()
            pipe.set(value_key, value)
            pipe.sadd(f"{prefix}:users", user)
            if old is None:
                pipe.hincrby(meta_key, "count", 1)
            else:
                digest = codec.digest_without(digest, [(user, old)])
            pipe.hset(meta_key, "digest", digest)
            created = old is None

        self.redis.transaction(write, meta_key, value_key)
        return created

    def erase_user(self, user: str) -> int:
        """Remove one user's prompt from every version of every model, including sets still
        being written; returns how many sets held a prompt of the user."""
        return sum(
            self._erase_from_set(spec["name"], str(_text(v)), user)
            for spec in self.list_models()
            for v in self.redis.zrange(f"{_REG}:versions:{spec['name']}", 0, -1)
        )

    def _erase_from_set(self, model: str, version: str, user: str) -> bool:
        """Erase one user from one set, atomically against sealing: this watches the metadata
        that sealing writes, sealing watches the tombstones that this writes.

        A sealed set loses the user, its count and its digest at once. A set still being
        written gets a tombstone instead, and sealing removes the user, so a chunk written after
        the erasure cannot bring the user back and the written set still verifies.
        """
        prefix = _set_prefix(model, version)
        meta_key, value_key = f"{prefix}:meta", f"{prefix}:u:{user}"
        held = False

        def erase(pipe: Pipeline) -> None:
            nonlocal held
            raw = pipe.hgetall(meta_key)
            meta = _parse_meta(raw) if raw else None
            old = _bytes(pipe.get(value_key))
            held = old is not None
            pipe.multi()
            if meta is not None and meta.state == WRITING:
                pipe.hset(f"{prefix}:erased", user, 1)
                return
            if old is None:
                return
            pipe.delete(value_key)
            pipe.srem(f"{prefix}:users", user)
            if meta is not None:
                pipe.hincrby(meta_key, "count", -1)
                pipe.hset(meta_key, "digest", codec.digest_without(meta.digest, [(user, old)]))

        self.redis.transaction(erase, meta_key, value_key)
        return held

    def delete_set(self, model: str, version: str) -> None:
        prefix = _set_prefix(model, version)
        if self.active_pointers().get(model) == version:
            raise ConflictError(f"{model} version {version} is active; activate another first.")
        # The metadata goes first: from then on readers find no set, never a set missing users.
        self.redis.delete(f"{prefix}:meta")
        for batch in _batched(self.redis.scan_iter(match=f"{prefix}:*", count=1000), 500):
            self.redis.delete(*batch)
        self.redis.zrem(f"{_REG}:versions:{model}", version)

    # ---- jobs ---------------------------------------------------------------------------------

    def create_job(
        self, record: dict[str, Any], *, idempotency_key: str | None, request_hash: str
    ) -> tuple[dict[str, Any], bool]:
        """Store a new job, or return the one made earlier with the same Idempotency-Key."""
        job_id = str(record["id"])
        if idempotency_key:
            idem = f"pm:{{jobs}}:idem:{idempotency_key}"
            claimed = self.redis.set(idem, f"{job_id} {request_hash}", nx=True, ex=7 * 86400)
            if not claimed:
                return self._existing_job(idem, request_hash), False
        self.redis.hset(_job_key(job_id), mapping={k: json.dumps(v) for k, v in record.items()})
        self.redis.zadd("pm:{jobs}:index", {job_id: float(record["created_at"])})
        return record, True

    def find_idempotent(self, idempotency_key: str, request_hash: str) -> dict[str, Any] | None:
        idem = f"pm:{{jobs}}:idem:{idempotency_key}"
        if not self.redis.exists(idem):
            return None
        return self._existing_job(idem, request_hash)

    def _existing_job(self, idem_key: str, request_hash: str) -> dict[str, Any]:
        for _ in range(50):  # the first request may still be writing its record
            stored = str(_text(self.redis.get(idem_key)) or "")
            job_id, _, stored_hash = stored.partition(" ")
            if stored_hash and stored_hash != request_hash:
                raise ConflictError(
                    "This Idempotency-Key was already used with a different request body; "
                    "use a new key for a different migration."
                )
            job = self.find_job(job_id)
            if job is not None:
                return job
            time.sleep(0.02)
        raise ConflictError("The job for this Idempotency-Key is still being created; retry.")

    def find_job(self, job_id: str) -> dict[str, Any] | None:
        raw = self.redis.hgetall(_job_key(job_id))
        if not raw:
            return None
        return {str(_text(k)): json.loads(v) for k, v in raw.items()}

    def get_job(self, job_id: str) -> dict[str, Any]:
        job = self.find_job(job_id)
        if job is None:
            raise NotFoundError(f"Unknown job {job_id!r}; list jobs with GET /migrations.")
        return job

    def update_job(self, job_id: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        self.redis.hset(_job_key(job_id), mapping={k: json.dumps(v) for k, v in fields.items()})

    def add_seconds(self, job_id: str, name: str, seconds: float) -> None:
        self.redis.hincrbyfloat(_job_key(job_id), name, seconds)

    def list_jobs(self, *, limit: int, offset: int) -> list[dict[str, Any]]:
        ids = self.redis.zrevrange("pm:{jobs}:index", offset, offset + limit - 1)
        jobs = (self.find_job(str(_text(i))) for i in ids)
        return [j for j in jobs if j is not None]

    def request_cancel(self, job_id: str) -> None:
        self.update_job(job_id, cancel_requested=True)

    def cancel_requested(self, job_id: str) -> bool:
        raw = self.redis.hget(_job_key(job_id), "cancel_requested")
        return bool(raw is not None and json.loads(raw))

    def put_blob(self, job_id: str, name: str, data: bytes) -> None:
        self.redis.set(f"{_job_key(job_id)}:blob:{name}", data)

    def get_blob(self, job_id: str, name: str) -> bytes | None:
        raw = self.redis.get(f"{_job_key(job_id)}:blob:{name}")
        return _bytes(raw)

    def mark_chunk_done(self, job_id: str, chunk: int, *, count: int, digest: str) -> bool:
        """Record a written chunk once; only the first completion counts towards progress."""
        key = f"{_job_key(job_id)}:chunks"
        first = bool(self.redis.hsetnx(key, str(chunk), json.dumps([count, digest])))
        if first:
            self.redis.hincrby(_job_key(job_id), "users_mapped", count)
        return first

    def chunks_done(self, job_id: str) -> dict[int, tuple[int, str]]:
        raw = self.redis.hgetall(f"{_job_key(job_id)}:chunks")
        return {
            int(str(_text(k))): (int(json.loads(v)[0]), str(json.loads(v)[1]))
            for k, v in raw.items()
        }

    def take_lease(self, job_id: str, name: str, *, holder: str, ttl_s: float) -> bool:
        """Hold ``name`` for ``ttl_s`` unless another holder does; the holder renews it."""
        key = f"{_job_key(job_id)}:lease:{name}"
        return bool(self.redis.set(key, holder, nx=True, px=int(ttl_s * 1000)))

    def renew_lease(self, job_id: str, name: str, *, holder: str, ttl_s: float) -> bool:
        """False when the lease expired or passed to another holder meanwhile."""
        key = f"{_job_key(job_id)}:lease:{name}"
        return bool(self.redis.eval(_RENEW_LUA, 1, key, holder, int(ttl_s * 1000)))

    def drop_lease(self, job_id: str, name: str, *, holder: str) -> None:
        self.redis.eval(_DROP_LUA, 1, f"{_job_key(job_id)}:lease:{name}", holder)

    def mark_busy(self, host: str, *, holder: str, ttl_s: float) -> None:
        """A worker on ``host`` runs a leased stage (its healthcheck reads this)."""
        self.redis.set(f"pm:{{workers}}:busy:{host}", holder, px=int(ttl_s * 1000))

    def busy_on(self, host: str) -> str | None:
        return _text(self.redis.get(f"pm:{{workers}}:busy:{host}"))

    def lease_holder(self, job_id: str, name: str) -> str | None:
        return _text(self.redis.get(f"{_job_key(job_id)}:lease:{name}"))

    def count(self, job_id: str, counter: str) -> None:
        self.redis.hincrby(f"{_job_key(job_id)}:counters", counter, 1)

    def counters(self, job_id: str) -> dict[str, int]:
        raw = self.redis.hgetall(f"{_job_key(job_id)}:counters")
        return {str(_text(k)): int(v) for k, v in raw.items()}


# Compare-and-act on a lease: only its holder renews or drops it.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_DROP_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _parse_meta(raw: dict[Any, Any]) -> SetMeta:
    fields = {str(_text(k)): _text(v) for k, v in raw.items()}
    meta = SetMeta(**json.loads(str(fields["doc"])))
    meta.state = str(fields.get("state", WRITING))
    meta.count = int(fields.get("count") or 0)
    meta.digest = str(fields.get("digest") or meta.digest)
    return meta


def _batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


USER_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


def validate_user_id(user: str) -> str:
    if not re.fullmatch(USER_ID_PATTERN, user):
        raise InvalidInputError(
            f"User id {user[:40]!r} is invalid; use 1-128 characters from A-Z a-z 0-9 _ . : -."
        )
    return user
