"""The API's asyncio read path: a user's value, or a batch of them, from the set readers get, in
one atomic round trip (two on Redis Cluster); the functions and their reply are in functions.py."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from prompt_migration_client.errors import NotFound
from prompt_migration_client.functions import NoActiveVersion, ReadFunctions

from app.errors import NotFoundError
from app.store.base import StoreBase
from app.store.functions import LIBRARY
from app.store.keys import MODELS, SetKeys
from app.store.meta import SEALED, SetFormat, SetMeta, parse_meta


class ReadsMixin(StoreBase):
    if TYPE_CHECKING:  # from SetsMixin

        def _cache_sealed(self, meta: SetMeta) -> SetFormat: ...

    _reads: ReadFunctions

    def load_functions(self) -> None:
        """Load (or replace) the read functions, on every primary of a Cluster."""
        self.redis.function_load(LIBRARY, replace=True)

    async def aload_functions(self) -> None:
        """``load_functions`` on the asyncio client."""
        assert self.aredis is not None
        await self.aredis.function_load(LIBRARY, replace=True)

    async def read_prompts(
        self, model: str | None, version: str | None, users: Sequence[str]
    ) -> tuple[SetFormat, list[bytes | None]]:
        """The readable set readers get and the users' values in it, in one atomic round trip.

        Same rules as resolve() + sealed_format() + get_prompts(): the active version of the model
        (the default model if none) unless ``version`` is given; only sealed sets are readable.
        """
        if self.aredis is None:
            raise RuntimeError("Store was built without an asyncio client")
        try:
            found_model, found_version, values = await self._reads.read(model, version, users)
        except NoActiveVersion as error:
            if not await self.aredis.hexists(MODELS, error.model):
                raise NotFoundError(
                    f"Unknown model {error.model!r}; register it first with POST /models."
                ) from None
            raise NotFoundError(
                f"Model {error.model!r} has no active prompt set; train one (POST /models/"
                f"{error.model}/train) or run a migration to it."
            ) from None
        except NotFound as error:  # the set is missing or not sealed
            raise NotFoundError(error.detail) from error
        found = self._sealed.get((found_model, found_version))
        if found is None:
            meta = await self._aget_meta(found_model, found_version)
            # The function saw the set sealed, and sealing is final.
            found = self._cache_sealed(meta) if meta.state == SEALED else meta.format()
        return found, values

    async def _aget_meta(self, model: str, version: str) -> SetMeta:
        assert self.aredis is not None
        raw = await self.aredis.hgetall(SetKeys(model, version).meta)
        if not raw:
            raise NotFoundError(f"Model {model!r} has no prompt set version {version!r}.")
        return parse_meta(raw)
