"""Reading prompts straight from the service's Redis, for inference services beside it.

``read`` calls the service's own read function (``pm_read`` by FCALL_RO, the API's read path):
the active pointer (or a pinned version), the seal check and the values in one round trip, so a
promotion lands wholly before or after it and an unsealed set is never read. The API loads the
function library at start-up; a reader cannot load code.

A Redis ACL user that may run only those functions, and read only what they read, is enough
(Redis 7; the tests read as this user and are refused everything else)::

    ACL SETUSER pm-reader on >READER_PASSWORD resetkeys %R~pm:{registry}:active %R~pm:{*}:meta
        %R~pm:{*}:u:* resetchannels -@all +fcall_ro +get +hget +ping

Redis checks the commands a function runs against its caller's ACL, so the user holds the GET
and HGET the function runs, on those keys only: no job records, datasets or models, no code, no
writes. The same rights let it GET a value key or HGET a set's metadata by name, without the seal
check; only the function's reads are atomic and refuse unsealed sets. On a Redis Cluster, create the user on every node and add ``+cluster|slots +command``
(the client's discovery of the nodes).
"""

from __future__ import annotations

from collections.abc import Sequence

from app.client.errors import NotFound, Unavailable
from app.client.http import Batch
from app.codec import decode
from app.errors import NotFoundError
from app.store import REDIS_DOWN, SEALED, SetFormat, connect_redis_async
from app.store.functions import ReadFunctions
from app.store.meta import parse_meta

# The ACL line above, as arguments of ACL SETUSER (without the password).
ACL_RULES = (
    "on", "resetkeys", "%R~pm:{registry}:active", "%R~pm:{*}:meta", "%R~pm:{*}:u:*",
    "resetchannels", "-@all", "+fcall_ro", "+get", "+hget", "+ping",
)  # fmt: skip
# What a reader on a Redis Cluster adds: the client's discovery of the nodes.
CLUSTER_ACL_RULES = ("+cluster|slots", "+command")


class DirectReader:
    """Async reads of the store at ``url`` (``redis://user:password@host:port/db``)."""

    def __init__(self, url: str, *, cluster: bool = False, timeout_s: float = 2.0) -> None:
        self.aredis = connect_redis_async(url, timeout_s=timeout_s, cluster=cluster)
        self._functions = ReadFunctions(self.aredis, reload=None)
        self._formats: dict[tuple[str, str], SetFormat] = {}  # sealed: never changes

    async def aclose(self) -> None:
        await self.aredis.aclose()

    async def _read(
        self, users: Sequence[str], model: str | None, version: str | None
    ) -> tuple[str, str, list[bytes | None]]:
        try:
            return await self._functions.read(model, version, users)
        except NotFoundError as error:
            raise NotFound(error.detail, status=404, code=error.code) from error
        except REDIS_DOWN as error:
            raise Unavailable(f"The store is unreachable: {error}", status=503) from error

    async def _format(self, model: str, version: str) -> SetFormat:
        found = self._formats.get((model, version))
        if found is None:
            try:
                doc = await self._functions.sealed_doc(model, version)
            except NotFoundError as error:
                raise NotFound(error.detail, status=404, code=error.code) from error
            except REDIS_DOWN as error:
                raise Unavailable(f"The store is unreachable: {error}", status=503) from error
            if len(self._formats) > 1024:
                self._formats.clear()
            found = self._formats[(model, version)] = parse_meta(
                {"doc": doc, "state": SEALED}
            ).format()
        return found

    async def read_raw(
        self, users: Sequence[str], *, model: str | None = None, version: str | None = None
    ) -> tuple[str, str, list[bytes | None]]:
        """(model, version, each user's bytes or None), atomically, as the API reads them."""
        return await self._read(users, model, version)

    async def read(
        self, users: Sequence[str], *, model: str | None = None, version: str | None = None
    ) -> Batch:
        """The users' prompts, ``[l, d]`` float32 each, from one version."""
        found_model, found_version, values = await self._read(users, model, version)
        found = await self._format(found_model, found_version)
        shape = tuple(found.shape)
        prompts = {
            user: decode(value, dtype=found.dtype, shape=shape)
            for user, value in zip(users, values, strict=True)
            if value is not None
        }
        missing = [user for user in users if user not in prompts]
        return Batch(found.model, found.version, prompts, missing)
