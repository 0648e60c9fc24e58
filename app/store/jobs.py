"""Job records: creation under an Idempotency-Key, progress, blobs and chunks the stages store,
the leases that keep one holder per stage, and the workers' busy markers."""

from __future__ import annotations

import json
import time
from typing import Any

from app.errors import ConflictError, NotFoundError
from app.store import keys
from app.store.base import StoreBase, as_bytes, as_text
from app.store.keys import JobKeys, job_key

# Compare-and-act on a lease: only its holder renews or drops it.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_DROP_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Delete an Idempotency-Key only while it still names the job (its value is "<job id> <hash>").
_FORGET_LUA = """
local value = redis.call('GET', KEYS[1])
if value and string.sub(value, 1, #ARGV[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class JobsMixin(StoreBase):
    def create_job(
        self, record: dict[str, Any], *, idempotency_key: str | None, request_hash: str
    ) -> tuple[dict[str, Any], bool]:
        """Store a new job, or return the one made earlier with the same Idempotency-Key."""
        job_id = str(record["id"])
        if idempotency_key:
            idem = keys.idempotency_key(idempotency_key)
            claimed = self.redis.set(idem, f"{job_id} {request_hash}", nx=True, ex=7 * 86400)
            if not claimed:
                return self._existing_job(idem, request_hash), False
        self.redis.hset(job_key(job_id), mapping={k: json.dumps(v) for k, v in record.items()})
        self.redis.zadd(keys.JOB_INDEX, {job_id: float(record["created_at"])})
        return record, True

    def forget_idempotency(self, idempotency_key: str, *, job_id: str) -> None:
        """Free the key of a job that never started, so a retry with it makes a new job."""
        idem = keys.idempotency_key(idempotency_key)
        self.redis.eval(_FORGET_LUA, 1, idem, f"{job_id} ")

    def find_idempotent(self, idempotency_key: str, request_hash: str) -> dict[str, Any] | None:
        idem = keys.idempotency_key(idempotency_key)
        if not self.redis.exists(idem):
            return None
        return self._existing_job(idem, request_hash)

    def _existing_job(self, idem_key: str, request_hash: str) -> dict[str, Any]:
        for _ in range(50):  # the first request may still be writing its record
            stored = str(as_text(self.redis.get(idem_key)) or "")
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
        raw = self.redis.hgetall(job_key(job_id))
        if not raw:
            return None
        return {str(as_text(k)): json.loads(v) for k, v in raw.items()}

    def get_job(self, job_id: str) -> dict[str, Any]:
        job = self.find_job(job_id)
        if job is None:
            raise NotFoundError(f"Unknown job {job_id!r}; list jobs with GET /migrations.")
        return job

    def update_job(self, job_id: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        self.redis.hset(job_key(job_id), mapping={k: json.dumps(v) for k, v in fields.items()})

    def add_seconds(self, job_id: str, name: str, seconds: float) -> None:
        self.redis.hincrbyfloat(job_key(job_id), name, seconds)

    def list_jobs(self, *, limit: int, offset: int) -> list[dict[str, Any]]:
        ids = self.redis.zrevrange(keys.JOB_INDEX, offset, offset + limit - 1)
        jobs = (self.find_job(str(as_text(i))) for i in ids)
        return [j for j in jobs if j is not None]

    def request_cancel(self, job_id: str) -> None:
        self.update_job(job_id, cancel_requested=True)

    def cancel_requested(self, job_id: str) -> bool:
        raw = self.redis.hget(job_key(job_id), "cancel_requested")
        return bool(raw is not None and json.loads(raw))

    # ---- what the stages store ----------------------------------------------------------------

    def put_blob(self, job_id: str, name: str, data: bytes) -> None:
        self.redis.set(JobKeys(job_id).blob(name), data)

    def get_blob(self, job_id: str, name: str) -> bytes | None:
        raw = self.redis.get(JobKeys(job_id).blob(name))
        return as_bytes(raw)

    def mark_chunk_done(self, job_id: str, chunk: int, *, count: int, digest: str) -> bool:
        """Record a written chunk once; only the first completion counts towards progress."""
        key = JobKeys(job_id).chunks
        first = bool(self.redis.hsetnx(key, str(chunk), json.dumps([count, digest])))
        if first:
            self.redis.hincrby(job_key(job_id), "users_mapped", count)
        return first

    def chunks_done(self, job_id: str) -> dict[int, tuple[int, str]]:
        raw = self.redis.hgetall(JobKeys(job_id).chunks)
        return {
            int(str(as_text(k))): (int(json.loads(v)[0]), str(json.loads(v)[1]))
            for k, v in raw.items()
        }

    # ---- leases and busy markers --------------------------------------------------------------

    def take_lease(self, job_id: str, name: str, *, holder: str, ttl_s: float) -> bool:
        """Hold ``name`` for ``ttl_s`` unless another holder does; the holder renews it."""
        key = JobKeys(job_id).lease(name)
        return bool(self.redis.set(key, holder, nx=True, px=int(ttl_s * 1000)))

    def renew_lease(self, job_id: str, name: str, *, holder: str, ttl_s: float) -> bool:
        """False when the lease expired or passed to another holder meanwhile."""
        key = JobKeys(job_id).lease(name)
        return bool(self.redis.eval(_RENEW_LUA, 1, key, holder, int(ttl_s * 1000)))

    def drop_lease(self, job_id: str, name: str, *, holder: str) -> None:
        self.redis.eval(_DROP_LUA, 1, JobKeys(job_id).lease(name), holder)

    def mark_busy(self, host: str, *, holder: str, ttl_s: float) -> None:
        """A worker on ``host`` runs a leased stage (its healthcheck reads this)."""
        self.redis.set(keys.busy_key(host), holder, px=int(ttl_s * 1000))

    def busy_on(self, host: str) -> str | None:
        return as_text(self.redis.get(keys.busy_key(host)))

    def lease_holder(self, job_id: str, name: str) -> str | None:
        return as_text(self.redis.get(JobKeys(job_id).lease(name)))

    # ---- counters -----------------------------------------------------------------------------

    def count(self, job_id: str, counter: str) -> None:
        self.redis.hincrby(JobKeys(job_id).counters, counter, 1)

    def counters(self, job_id: str) -> dict[str, int]:
        raw = self.redis.hgetall(JobKeys(job_id).counters)
        return {str(as_text(k)): int(v) for k, v in raw.items()}
