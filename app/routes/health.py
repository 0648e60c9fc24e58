"""Liveness, readiness and Prometheus metrics (no token: probes and scrapers)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from app.deps import CeleryDep, StoreDep
from app.store import REDIS_DOWN

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, Any]  # "redis": "ok" or why not; "workers": how many answered, or why none


_METRICS_TEXT = {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
def readyz(store: StoreDep, celery: CeleryDep) -> JSONResponse:
    checks: dict[str, Any] = {}
    try:
        checks["redis"] = "ok" if store.ping() else "no answer"
    except REDIS_DOWN as exc:
        checks["redis"] = f"unreachable: {exc}"
    try:
        replies = celery.control.ping(timeout=1.0) or []
        checks["workers"] = len(replies) if replies else "no worker answered"
    except Exception as exc:  # the broker itself may be down
        checks["workers"] = f"broker unreachable: {exc}"
    ready = checks["redis"] == "ok" and isinstance(checks["workers"], int)
    return JSONResponse({"ready": ready, "checks": checks}, 200 if ready else 503)


@router.get("/metrics", response_class=Response, responses={200: _METRICS_TEXT})
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
