"""Service settings, read once from the environment (prefix ``PM_``) and validated at start-up."""

from __future__ import annotations

import json
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.assets import cache_dir

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
_MIN_TOKEN_CHARS = 32
_DEV_PLACEHOLDERS = {"", "changeme", "admin", "read", "dev", "secret", "token"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PM_", env_file=None, extra="ignore")

    # Production unless said otherwise: a deployment that forgot the variable still refuses weak
    # or identical tokens. `make run` and the tests say "development" / "test" themselves.
    environment: Literal["development", "test", "production"] = "production"
    redis_url: str = DEFAULT_REDIS_URL
    # True when PM_REDIS_URL names a node of a Redis Cluster (the store's keys are laid out for
    # one); Celery cannot use a Cluster, so the broker and result backend then need their own.
    redis_cluster: bool = False
    # Production keeps the broker on its own noeviction Redis; empty means "same as redis_url".
    broker_url: str = ""
    result_backend: str = ""
    admin_token: SecretStr | None = None
    read_token: SecretStr | None = None

    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # Set imports stream to a temporary file, so they may be far larger than other bodies.
    max_import_bytes: int = Field(default=64 * 1024**3, ge=1024)
    max_batch_users: int = Field(default=1000, ge=1)
    # A batch's reply, bounded in bytes too: users times prompt size, whatever the model.
    max_batch_reply_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    redis_timeout_s: float = Field(default=2.0, gt=0)
    # The store's ACL users of direct readers (app/client/direct.py), comma separated
    # (PM_READER_ACL_USERS=pm-reader) or a JSON list: the service grants them the keys of the
    # readable sets and no others (app/store/reader_acl.py), and checks the grants every
    # reader_acl_sync_s. Empty: the service manages no ACL.
    reader_acl_users: Annotated[list[str], NoDecode] = []
    reader_acl_sync_s: float = Field(default=10.0, gt=0)

    # Workers.
    device: str | None = None
    # Users per chunk task: from 1,024 up the chunk path runs at the same rate (bench/README.md,
    # "The chunk path"), and larger chunks send fewer broker messages and chunk records.
    chunk_size: int = Field(default=4096, ge=1)
    # Users whose prompts a migration's training stage reads: a seeded sample of at most this many
    # fits the adapter's input statistics and, of those with ratings, the selection; the stage's
    # memory is bounded by it, not by the population.
    sample_users: int = Field(default=20_000, ge=1)
    # Test users the quality gate and the job's metrics are computed on (a seeded sample).
    eval_users: int = Field(default=2_000, ge=1)
    # Torch threads for mapping a chunk: one leaves the other cores to Redis and the I/O, and
    # spares the barriers that several threads cost on a busy machine.
    map_threads: int = Field(default=1, ge=1)
    # Torch threads for the model stages (the frozen models, the adapter's training, the
    # evaluation). Unset: one fewer than the cores the worker may use, at least one, so a host
    # it shares with the API and Redis keeps a core for reads; on two cores that halved what a
    # 100,000-user job adds to the reads' p99, for 5-10% of its time (bench/README.md).
    model_threads: int | None = Field(default=None, ge=1)
    # The worker's CPU priority on a host it shares with the API and Redis (make run, a small
    # deployment). "idle" (SCHED_IDLE) runs a migration only on CPU time they leave, so reads keep
    # their latency during it; a niceness 0-19 instead keeps the worker a share of a host whose
    # serving never leaves a core idle. On a host of its own, neither changes anything.
    worker_priority: Literal["idle"] | Annotated[int, Field(ge=0, le=19)] = "idle"
    # PM_WORKER_NICE, the setting worker_priority replaced: refused, so that a deployment still
    # setting it learns the new name instead of having its niceness silently dropped.
    worker_nice: str | None = Field(default=None, exclude=True, repr=False)
    # A write to a followed set sends one follow task at most per this window (the task waits it
    # out, so the writes of the window go in one drain): the bound on the messages per follower.
    follow_delay_s: float = Field(default=0.2, ge=0)
    # How long a sent follow task keeps writers from sending another; past it (a lost task),
    # the next write sends one again.
    follow_wake_ttl_s: float = Field(default=10.0, gt=0)
    follow_batch: int = Field(default=256, ge=1)
    write_batch: int = Field(default=500, ge=1)
    visibility_timeout_s: int = Field(default=3600, ge=1)
    # A running stage renews its lease every third of this; a dead holder's stage is taken over
    # by the redelivered task once it lapses.
    lease_ttl_s: float = Field(default=60.0, gt=0)
    restore_interval_s: int = Field(default=10, ge=1)
    # A stage whose worker died this many times while running it (killed, e.g. for memory)
    # fails its job instead of being delivered again for ever.
    max_stage_runs: int = Field(default=3, ge=1)
    # Each run of a stage must end within this, or its job fails (checked by the stage between
    # steps: the solo pool enforces no Celery time limit).
    stage_time_limit_s: float = Field(default=12 * 3600, gt=0)
    # Retries of a stage through a store outage, with exponential backoff (8: about 4 minutes);
    # after them its job fails.
    store_retries: int = Field(default=8, ge=0, le=20)
    quality_tolerance: float = Field(default=0.05, ge=0)
    version_grace_s: int = Field(default=24 * 3600, ge=0)
    model_cache_size: int = Field(default=2, ge=1)
    # Where workers keep the frozen models' keys/values over each item text across jobs and
    # restarts (models/prefix_cache.py): the next job on a model skips running it over the items
    # again. About 1 to 2 MB per item and model for the built-in models; empty keeps them in
    # memory only.
    item_state_dir: Path | None = Field(default_factory=lambda: cache_dir() / "item-states")
    # The disk it may take, every model's states together: past it the states used longest ago
    # are deleted (and computed again when a job meets their items). At 1 to 2 MB per item and
    # model, 20 GB holds MovieLens-1M's 3,706 items on two models.
    item_state_max_gb: float = Field(default=20.0, gt=0)

    @field_validator("item_state_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("worker_nice")
    @classmethod
    def _renamed_to_worker_priority(cls, value: str | None) -> None:
        if value is not None:
            raise ValueError(
                "PM_WORKER_NICE is no longer read: set PM_WORKER_PRIORITY instead, to a niceness "
                f"0-19 (PM_WORKER_PRIORITY={value.strip()} keeps this one) or to idle, the "
                "default, and remove PM_WORKER_NICE."
            )
        return None

    @field_validator("reader_acl_users", mode="before")
    @classmethod
    def _user_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            return (
                json.loads(text)
                if text.startswith("[")
                else [user.strip() for user in text.split(",") if user.strip()]
            )
        return value

    @model_validator(mode="after")
    def _cluster_needs_a_broker(self) -> Settings:
        if not self.redis_cluster:
            return self
        celery_urls = {self.broker_url, self.result_backend}
        if "" in celery_urls or self.redis_url in celery_urls:
            raise ValueError(
                "PM_REDIS_CLUSTER is on, and Celery cannot use a Redis Cluster: set "
                "PM_BROKER_URL and PM_RESULT_BACKEND to a plain Redis (or RabbitMQ for the broker)."
            )
        if urlparse(self.redis_url).path.strip("/") not in ("", "0"):
            raise ValueError(
                "A Redis Cluster has only database 0: drop the database number from PM_REDIS_URL."
            )
        return self

    @model_validator(mode="after")
    def _tokens(self) -> Settings:
        if self.environment == "production":
            for name in ("admin_token", "read_token"):
                _require_strong(name, getattr(self, name))
            if self.admin_token == self.read_token:
                raise ValueError("PM_ADMIN_TOKEN and PM_READ_TOKEN must differ in production.")
            return self
        # Development: a missing token gets a random one (``python -m app.dev.run`` prints them).
        if self.admin_token is None:
            self.admin_token = SecretStr(secrets.token_urlsafe(32))
        if self.read_token is None:
            self.read_token = SecretStr(secrets.token_urlsafe(32))
        return self

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def backend(self) -> str:
        return self.result_backend or self.redis_url


def _require_strong(name: str, token: SecretStr | None) -> None:
    value = token.get_secret_value() if token else ""
    env = f"PM_{name.upper()}"
    if value.lower() in _DEV_PLACEHOLDERS or len(value) < _MIN_TOKEN_CHARS:
        raise ValueError(
            f"{env} is missing or a default value; production needs a random token of at least "
            f"{_MIN_TOKEN_CHARS} characters (e.g. `python -c 'import secrets; "
            f"print(secrets.token_urlsafe(32))'`)."
        )


@lru_cache
def get_settings() -> Settings:
    return Settings()
