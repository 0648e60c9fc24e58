"""Reading prompts straight from the service's Redis, for inference services beside it.

``read`` runs the API's own atomic read script (``Store.read_prompts``): the active pointer (or a
pinned version), the seal check and the values in one round trip, so a promotion lands wholly
before or after it and an unsealed set is never read. ``get`` is one plain GET of a pinned
version's value with none of those checks, the floor the atomic read is measured against.

A read-only Redis ACL user is enough for both (Redis 7; the tests read as this user)::

    ACL SETUSER pm-reader on >READER_PASSWORD resetkeys ~pm:* resetchannels -@all
        +get +hget +hgetall +hexists +evalsha +script|load +ping

Keys are ``~pm:*``, not read-only ``%R~pm:*``: Redis declares EVALSHA's keys as read-write. The
user still cannot write: commands are checked inside scripts too, and no write command is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence

from redis import Redis

from app.client.errors import NotFound, Unavailable
from app.client.http import Batch
from app.codec import decode
from app.errors import NotFoundError
from app.store import REDIS_DOWN, SetFormat, Store, connect_redis_async

# The ACL line above, as arguments of ACL SETUSER (without the password).
ACL_RULES = (
    "on", "resetkeys", "~pm:*", "resetchannels", "-@all", "+get", "+hget", "+hgetall",
    "+hexists", "+evalsha", "+script|load", "+ping",
)  # fmt: skip


class DirectReader:
    """Async reads of the store at ``url`` (``redis://user:password@host:port/db``)."""

    def __init__(self, url: str, *, cluster: bool = False, timeout_s: float = 2.0) -> None:
        # The sync client is never used for reads; Store wants one and connects lazily.
        self.store = Store(
            Redis.from_url(url), aredis=connect_redis_async(url, timeout_s=timeout_s,
                                                            cluster=cluster)
        )  # fmt: skip

    async def aclose(self) -> None:
        if self.store.aredis is not None:
            await self.store.aredis.aclose()
        self.store.redis.close()

    async def _read(
        self, users: Sequence[str], model: str | None, version: str | None
    ) -> tuple[SetFormat, list[bytes | None]]:
        try:
            return await self.store.read_prompts(model, version, users)
        except NotFoundError as error:
            raise NotFound(error.detail, status=404, code=error.code) from error
        except REDIS_DOWN as error:
            raise Unavailable(f"The store is unreachable: {error}", status=503) from error

    async def read_raw(
        self, users: Sequence[str], *, model: str | None = None, version: str | None = None
    ) -> tuple[str, str, list[bytes | None]]:
        """(model, version, each user's bytes or None), atomically, as the API reads them."""
        found, values = await self._read(users, model, version)
        return found.model, found.version, values

    async def read(
        self, users: Sequence[str], *, model: str | None = None, version: str | None = None
    ) -> Batch:
        """The users' prompts, ``[l, d]`` float32 each, from one version."""
        found, values = await self._read(users, model, version)
        shape = tuple(found.shape)
        prompts = {
            user: decode(value, dtype=found.dtype, shape=shape)
            for user, value in zip(users, values, strict=True)
            if value is not None
        }
        missing = [user for user in users if user not in prompts]
        return Batch(found.model, found.version, prompts, missing)

    async def get(self, user: str, *, model: str, version: str) -> bytes | None:
        """One plain GET of a pinned version's value: no pointer, no seal check."""
        return await self.store.aget_prompt(model, version, user)
