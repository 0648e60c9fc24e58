"""Every key name of the store, and the names that go into keys: the only code that knows them.

Layout (every group shares a hash tag, so the store works on Redis Cluster):

- ``pm:{registry}:models``          hash  model name -> JSON spec
- ``pm:{registry}:active``          hash  model -> active version, ``__default__`` -> model;
                                    one HSET switches what readers get, atomically
- ``pm:{registry}:versions:<model>`` zset  version -> created time
- ``pm:{registry}:seq``             hash  model -> last allocated version number
- ``pm:{registry}:datasets``        hash  dataset name -> JSON spec
- ``pm:{registry}:retired``         zset  "model/version" -> purge-after time
- ``pm:{registry}:reader-acl``      string a lock: one process at a time sets the readers' grants
- ``pm:{<model>:<version>}:meta``   hash  doc (JSON: shape, dtype, task, lineage, ...), state, and
                                    the set's current count and digest (onboarding and erasure
                                    keep both up to date)
- ``pm:{<model>:<version>}:head``   task head, safetensors bytes
- ``pm:{<model>:<version>}:users``  set   user ids
- ``pm:{<model>:<version>}:u:<user>`` raw little-endian prompt bytes
- ``pm:{<model>:<version>}:erased`` hash  users erased while the set was being written
- ``pm:{<model>:<version>}:followers`` hash "<model>/<version>" of each set that follows this one
                                    (a migration's target) -> its job id
- ``pm:{<model>:<version>}:pending:<model>/<version>`` hash user -> stamp (ns) of the user's last
                                    write here that the named follower has not applied yet;
                                    on this set's tag, so a write records it atomically
- ``pm:{<model>:<version>}:follows`` hash "<model>/<version>" of each set this one follows -> job id
- ``pm:{<model>:<version>}:stamps`` hash user -> stamp of the write a follower's value comes from
- ``pm:{<model>:<version>}:follow-wake`` string set while a follow task is on its way
- ``pm:{job:<id>}``                 hash  job record, one JSON value per field
- ``pm:{job:<id>}:chunks``          hash  chunk index -> JSON {count, digest} once written
- ``pm:{job:<id>}:plan``            hash  chunk index -> the chunk's user ids, one per line
- ``pm:{job:<id>}:planned``         set   every user the plan holds (so a user is planned once)
- ``pm:{job:<id>}:blob:<name>``     bytes (the trained adapter, the selected users)
- ``pm:{job:<id>}:lease:<stage>``   string the holder of a running stage, with a TTL it renews
- ``pm:{job:<id>}:counters``        hash  counter -> int (stage runs, deliveries that waited)
- ``pm:{jobs}:index``               zset  job id -> created time
- ``pm:{workers}:busy:<host>``      string a stage's lease holder on that host, with the lease's TTL
- ``pm:{jobs}:idem:<key>``          string job id (+ request hash) for Idempotency-Key

The read functions (``app/store/functions.py``) build a set's keys in Lua the same way as
:class:`SetKeys`.
"""

from __future__ import annotations

# The keys the read functions are handed are the client's, since direct readers hand them too:
# ACTIVE (model -> active version; DEFAULT_MODEL -> the default model) and a set's prefix.
from prompt_migration_client.functions import ACTIVE as ACTIVE
from prompt_migration_client.functions import DEFAULT_MODEL as DEFAULT_MODEL
from prompt_migration_client.functions import set_prefix as set_prefix
from prompt_migration_client.ids import USER_ID_PATTERN as USER_ID_PATTERN  # the loaders' too
from prompt_migration_client.ids import USER_ID_RULE, is_user_id

from app.errors import InvalidInputError

# ---- the registry: one hash tag, so a registry change is one slot's ---------------------------

REGISTRY = "pm:{registry}"
MODELS = f"{REGISTRY}:models"
SEQ = f"{REGISTRY}:seq"
DATASETS = f"{REGISTRY}:datasets"
RETIRED = f"{REGISTRY}:retired"
READER_ACL_LOCK = f"{REGISTRY}:reader-acl"


def versions_key(model: str) -> str:
    return f"{REGISTRY}:versions:{model}"


# ---- prompt sets: a set's keys share the hash tag {model:version} -----------------------------


class SetKeys:
    """The keys of one prompt set."""

    __slots__ = ("prefix",)

    def __init__(self, model: str, version: str) -> None:
        self.prefix = set_prefix(model, version)

    @property
    def meta(self) -> str:
        return f"{self.prefix}:meta"

    @property
    def head(self) -> str:
        return f"{self.prefix}:head"

    @property
    def users(self) -> str:
        return f"{self.prefix}:users"

    @property
    def erased(self) -> str:
        return f"{self.prefix}:erased"

    @property
    def values(self) -> str:
        """What every value key starts with: a user's value key is this and the user id."""
        return f"{self.prefix}:u:"

    def value(self, user: str) -> str:
        return f"{self.prefix}:u:{user}"

    @property
    def followers(self) -> str:
        return f"{self.prefix}:followers"

    def pending(self, follower: str) -> str:
        """The users written here that ``follower`` ("<model>/<version>") has yet to apply."""
        return f"{self.prefix}:pending:{follower}"

    @property
    def follows(self) -> str:
        return f"{self.prefix}:follows"

    @property
    def stamps(self) -> str:
        return f"{self.prefix}:stamps"

    @property
    def wake(self) -> str:
        return f"{self.prefix}:follow-wake"

    @property
    def pattern(self) -> str:
        """A SCAN pattern for every key of the set."""
        return f"{self.prefix}:*"


def set_name(model: str, version: str) -> str:
    """How one set names another in the follow hashes (and in the retired versions)."""
    return f"{model}/{version}"


def value_key_prefix(model: str, version: str) -> str:
    """What every value key of a set starts with (for readers that build value keys in bulk)."""
    return SetKeys(model, version).values


# ---- jobs and workers -------------------------------------------------------------------------

JOB_INDEX = "pm:{jobs}:index"


def idempotency_key(key: str) -> str:
    return f"pm:{{jobs}}:idem:{key}"


def busy_key(host: str) -> str:
    return f"pm:{{workers}}:busy:{host}"


def job_key(job_id: str) -> str:
    return f"pm:{{job:{job_id}}}"


class JobKeys:
    """The keys of one job's record and what its stages store."""

    __slots__ = ("record",)

    def __init__(self, job_id: str) -> None:
        self.record = job_key(job_id)

    @property
    def chunks(self) -> str:
        return f"{self.record}:chunks"

    @property
    def counters(self) -> str:
        return f"{self.record}:counters"

    @property
    def plan(self) -> str:
        return f"{self.record}:plan"

    @property
    def planned(self) -> str:
        return f"{self.record}:planned"

    def blob(self, name: str) -> str:
        return f"{self.record}:blob:{name}"

    def lease(self, stage: str) -> str:
        return f"{self.record}:lease:{stage}"


# ---- the names that go into keys --------------------------------------------------------------

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


def validate_user_id(user: str) -> str:
    if not is_user_id(user):
        raise InvalidInputError(f"User id {user[:40]!r} is invalid; use {USER_ID_RULE}.")
    return user
