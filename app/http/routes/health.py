"""Liveness, readiness and Prometheus metrics (no token: probes and scrapers)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from app.http.deps import ReadinessDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


class ReadinessOut(BaseModel):
    ready: bool
    checks: dict[str, Any]  # "redis": "ok" or why not; "workers": how many answered, or why none


_METRICS_TEXT = {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}


@router.get("/readyz", response_model=ReadinessOut, responses={503: {"model": ReadinessOut}})
async def readyz(probe: ReadinessDep) -> JSONResponse:
    readiness = await probe.check()
    body = {"ready": readiness.ready, "checks": readiness.checks}
    return JSONResponse(body, 200 if readiness.ready else 503)


@router.get("/metrics", response_class=Response, responses={200: _METRICS_TEXT})
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
