"""Migration jobs (and prompt-training jobs, which share the job record)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status

from app.http.deps import AdminDep, CeleryDep, ReaderDep, StoreDep
from app.http.schemas import Job, JobList
from app.jobs import records as jobs
from app.jobs.spec import MigrationCreate

router = APIRouter(prefix="/migrations", tags=["migrations"])

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=r"^[A-Za-z0-9_.:-]{1,128}$",
        description="Repeat a request with the same key to get the same job back.",
    ),
]


@router.post("", response_model=Job, status_code=status.HTTP_201_CREATED)
def create_migration(
    body: MigrationCreate,
    store: StoreDep,
    celery: CeleryDep,
    _: AdminDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> Job:
    job, created = jobs.create_migration(store, celery, body, idempotency_key=idempotency_key)
    if not created:
        response.status_code = status.HTTP_200_OK
    return jobs.view(job)


@router.get("", response_model=JobList)
def list_migrations(
    store: StoreDep,
    _: ReaderDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    # Redis ranges are 64-bit; past 2**53 (JSON's exact integers) no page exists anyway.
    offset: Annotated[int, Query(ge=0, le=2**53)] = 0,
) -> JobList:
    return JobList(jobs=[jobs.view(j) for j in store.list_jobs(limit=limit, offset=offset)])


@router.get("/{job_id}", response_model=Job)
def get_migration(job_id: str, store: StoreDep, _: ReaderDep) -> Job:
    return jobs.view(store.get_job(job_id))


@router.post("/{job_id}/cancel", response_model=Job, status_code=status.HTTP_202_ACCEPTED)
def cancel_migration(job_id: str, store: StoreDep, _: AdminDep) -> Job:
    return jobs.view(jobs.cancel(store, job_id))


@router.post("/{job_id}/promote", response_model=Job)
def promote_migration(
    job_id: str,
    store: StoreDep,
    _: AdminDep,
    force: Annotated[bool, Query(description="Promote even if the quality gate failed.")] = False,
) -> Job:
    return jobs.view(jobs.promote(store, job_id, force=force))
