"""A migration's plan: chunks of user ids stored one hash field each, so that a stage reads the
chunk it maps and no process holds every id; and the users already planned, so that a planning
pass resumed or repeated (the late users' rounds) plans each user once."""

from __future__ import annotations

from collections.abc import Sequence

from app.store.base import StoreBase, as_text
from app.store.keys import JobKeys


class PlansMixin(StoreBase):
    def unplanned(self, job_id: str, users: Sequence[str]) -> list[str]:
        """Those of ``users`` no chunk of the plan holds yet."""
        if not users:
            return []
        member = self.redis.smismember(JobKeys(job_id).planned, list(users))
        return [u for u, m in zip(users, member, strict=True) if not m]

    def add_plan_chunk(self, job_id: str, users: Sequence[str]) -> int:
        """Append a chunk to the plan; returns its index. The chunk and its users' planned marks
        land in one transaction: a stage killed in between leaves both or neither."""
        job_keys = JobKeys(job_id)
        index = int(self.redis.hlen(job_keys.plan))
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(job_keys.plan, str(index), "\n".join(users))
        pipe.sadd(job_keys.planned, *users)
        pipe.execute()
        return index

    def plan_chunk(self, job_id: str, index: int) -> list[str]:
        raw = as_text(self.redis.hget(JobKeys(job_id).plan, str(index)))
        return raw.split("\n") if raw else []

    def plan_size(self, job_id: str) -> int:
        """Chunks in the plan."""
        return int(self.redis.hlen(JobKeys(job_id).plan))

    def planned_users(self, job_id: str) -> int:
        return int(self.redis.scard(JobKeys(job_id).planned))

    def drop_plan(self, job_id: str) -> None:
        """Free the plan once the set is sealed (UNLINK: freed off Redis's main thread)."""
        job_keys = JobKeys(job_id)
        self.redis.unlink(job_keys.plan, job_keys.planned)
