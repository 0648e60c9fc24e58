"""Reading prompts straight from the service's Redis, for inference services beside it.

``read`` calls the service's own read function (``pm_read`` by FCALL_RO, the API's read path):
the active pointer (or a pinned version), the seal check and the values in one round trip, so a
promotion lands wholly before or after it and an unsealed set is never read. The API loads the
function library at start-up; a reader cannot load code.

A Redis ACL user that may run only those functions is enough (Redis 7; the tests read as this
user and are refused everything else). Create it with these base rules, which grant no set::

    ACL SETUSER pm-reader on >READER_PASSWORD resetkeys %R~pm:{registry}:active
        resetchannels -@all +fcall_ro +get +hget +ping

and name it in the service's ``PM_READER_ACL_USERS``. Redis checks the commands a function runs
against its caller's ACL, so the user holds the GET and HGET the function runs; the service
grants them on the keys of the readable sets only (sealed, not deleted), so a GET or HGET by key
name reaches nothing the function would refuse: no set still being written, no job records,
datasets or models, no code, no writes. A set the user is not granted
reads as :class:`Unauthorized` (a restarted Redis has the base rules until the API grants the
sets again, within seconds). On a Redis Cluster, create the user on every node and add
``+cluster|slots +command`` (the client's discovery of the nodes).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from redis.exceptions import NoPermissionError, ResponseError

from prompt_migration_client.batch import Batch
from prompt_migration_client.codec import decode
from prompt_migration_client.errors import Unauthorized, Unavailable
from prompt_migration_client.functions import REDIS_DOWN, ReadFunctions, connect

# The base rules above, as arguments of ACL SETUSER (without the password).
ACL_RULES = (
    "on",
    "resetkeys",
    "%R~pm:{registry}:active",
    "resetchannels",
    "-@all",
    "+fcall_ro",
    "+get",
    "+hget",
    "+ping",
)
# What a reader on a Redis Cluster adds: the client's discovery of the nodes.
CLUSTER_ACL_RULES = ("+cluster|slots", "+command")


def _not_granted(error: ResponseError) -> bool:
    """A key the reader's ACL does not grant: NOPERM for a declared key, or a function's refused
    GET or HGET."""
    refused = "can't access at least one of the keys" in str(error)
    return refused or isinstance(error, NoPermissionError)


@contextlib.contextmanager
def _client_errors(model: str | None, version: str | None) -> Iterator[None]:
    """The client's typed errors for what a read raises."""
    try:
        yield
    except REDIS_DOWN as error:
        if isinstance(error, ResponseError) and _not_granted(error):
            what = f"{model or 'the default model'} version {version or '(active)'}"
            raise Unauthorized(
                f"This reader's Redis user is not granted {what}: the set is not sealed, was "
                "deleted, or the service has not granted it yet (it grants the readable sets to "
                "the users in PM_READER_ACL_USERS, within seconds after a Redis restart).",
                status=403,
                code="not_granted",
            ) from error
        raise Unavailable(f"The store is unreachable: {error}", status=503) from error


@dataclass(frozen=True)
class _Format:
    """What decoding a sealed set's values needs (it never changes once sealed)."""

    model: str
    version: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, doc: str) -> _Format:
        """From the set's metadata document, as ``pm_format`` returns it."""
        fields = json.loads(doc)
        shape = tuple(int(n) for n in fields["shape"])
        return cls(
            str(fields["model"]), str(fields["version"]), shape, str(fields.get("dtype", "float32"))
        )


class DirectReader:
    """Async reads of the store at ``url`` (``redis://user:password@host:port/db``)."""

    def __init__(self, url: str, *, cluster: bool = False, timeout_s: float = 2.0) -> None:
        self.aredis = connect(url, timeout_s=timeout_s, cluster=cluster)
        self._functions = ReadFunctions(self.aredis, reload=None)
        self._formats: dict[tuple[str, str], _Format] = {}  # sealed: never changes

    async def aclose(self) -> None:
        await self.aredis.aclose()

    async def _read(
        self, users: Sequence[str], model: str | None, version: str | None
    ) -> tuple[str, str, list[bytes | None]]:
        with _client_errors(model, version):
            found = await self._functions.read(model, version, users)
        return found

    async def _format(self, model: str, version: str) -> _Format:
        found = self._formats.get((model, version))
        if found is None:
            with _client_errors(model, version):
                doc = await self._functions.sealed_doc(model, version)
            if len(self._formats) > 1024:
                self._formats.clear()
            found = self._formats[(model, version)] = _Format.of(doc)
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
        prompts = {
            user: decode(value, dtype=found.dtype, shape=found.shape)
            for user, value in zip(users, values, strict=True)
            if value is not None
        }
        missing = [user for user in users if user not in prompts]
        return Batch(found.model, found.version, prompts, missing)
