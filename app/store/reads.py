"""The API's asyncio read path: a user's value, or a batch of them, from the set readers get, in
one atomic round trip (two on Redis Cluster); the scripts and their reply are in scripts.py."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from app.errors import NotFoundError
from app.store.base import StoreBase, as_bytes, as_text
from app.store.connect import REDIS_DOWN
from app.store.keys import ACTIVE, MODELS, SetKeys
from app.store.meta import SEALED, SetFormat, SetMeta, parse_meta

T = TypeVar("T")


class ReadsMixin(StoreBase):
    if TYPE_CHECKING:  # from SetsMixin

        def _cache_sealed(self, meta: SetMeta) -> SetFormat: ...

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
            reply = await self._discovered(lambda: self._read_in_two_steps(pointer, users))
        else:
            reply = await self._evalsha(self._read_script, keys=[ACTIVE],
                                        args=[*pointer, *users])  # fmt: skip
        code = int(reply[0])
        if code == 0:
            raise NotFoundError("No model is active yet; promote a migration or activate a model.")
        found_model = str(as_text(reply[1]))
        if code == 1:
            if not await self.aredis.hexists(MODELS, found_model):
                raise NotFoundError(
                    f"Unknown model {found_model!r}; register it first with POST /models."
                )
            raise NotFoundError(
                f"Model {found_model!r} has no active prompt set; train one (POST /models/"
                f"{found_model}/train) or run a migration to it."
            )
        found_version = str(as_text(reply[2]))
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

    async def _discovered(self, read: Callable[[], Awaitable[T]]) -> T:
        """``read()`` on Redis Cluster (see scripts.py). Before the first read and after a failed
        one the client discovers the nodes once, while other reads wait: redis-py (8.1) would let
        every concurrent read discover them at once, and those races drop connections still in
        use."""
        assert self.aredis is not None
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
            resolved = await self._evalsha(self._resolve_script, keys=[ACTIVE], args=pointer)
            if int(resolved[0]) != 3:
                return list(resolved)
            model, version = str(as_text(resolved[1])), str(as_text(resolved[2]))
        set_keys = SetKeys(model, version)
        values = set_keys.values
        read_keys = [set_keys.meta, *(f"{values}{user}" for user in users)]
        return list(
            await self._evalsha(self._read_set_script, keys=read_keys, args=[model, version])
        )

    async def aget_prompt(self, model: str, version: str, user: str) -> bytes | None:
        """One plain GET of a user's value, without the read script's pointer and seal checks
        (what a direct reader that pinned a sealed version may use)."""
        aredis = self.aredis
        if aredis is None:
            raise RuntimeError("Store was built without an asyncio client")
        key = SetKeys(model, version).value(user)
        if self._cluster:
            return as_bytes(await self._discovered(lambda: aredis.get(key)))
        return as_bytes(await aredis.get(key))

    async def _aget_meta(self, model: str, version: str) -> SetMeta:
        assert self.aredis is not None
        raw = await self.aredis.hgetall(SetKeys(model, version).meta)
        if not raw:
            raise NotFoundError(f"Model {model!r} has no prompt set version {version!r}.")
        return parse_meta(raw)
