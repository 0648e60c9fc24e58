"""Assembles the API: settings, store, Celery client, handlers, middleware and routers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.config import Settings, get_settings
from app.http import fastpath, handlers, metrics
from app.http.fastpath import PromptFastPath
from app.http.readiness import ReadinessProbe
from app.http.routes import bundles, datasets, health, migrations, models, prompts, transfer
from app.http.schemas import ERROR_RESPONSES
from app.jobs.queue import make_celery
from app.store import REDIS_DOWN, Store, connect_redis, connect_redis_async
from app.store.reader_acl import keep_reader_acl


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store: Store = app.state.store
        # The read functions, for the API and for direct readers (who may not load them); a
        # Redis that is down now gets them on the API's first read after it is back.
        with contextlib.suppress(*REDIS_DOWN):
            await store.aload_functions()
        # The direct readers' grants: a service user that may not set them stops the start-up
        # (ReaderAclError says what to grant); a Redis that is down gets them on a later check.
        with contextlib.suppress(*REDIS_DOWN):
            await asyncio.to_thread(store.sync_reader_acl)
        grants = asyncio.create_task(keep_reader_acl(store, every_s=settings.reader_acl_sync_s))
        # Everything built at start-up moves out of the collector's reach: a full collection of
        # it stalls every in-flight read (the read path's p99, bench/README.md).
        gc.collect()
        gc.freeze()
        yield
        grants.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await grants
        store.redis.close()
        if store.aredis is not None:
            await store.aredis.aclose()

    app = FastAPI(
        title="Prompt migration service",
        summary="Migrates per-user soft prompts to a new foundation model and serves them.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    url, timeout_s, cluster = settings.redis_url, settings.redis_timeout_s, settings.redis_cluster
    redis = connect_redis(url, timeout_s=timeout_s, cluster=cluster)
    # The read hot path (GET /users/{id}/prompt, POST /prompts/batch) uses the asyncio client;
    # the other routes and the workers use the sync one.
    aredis = connect_redis_async(url, timeout_s=timeout_s, cluster=cluster)
    app.state.store = Store(
        redis,
        write_batch=settings.write_batch,
        aredis=aredis,
        reader_acl_users=settings.reader_acl_users,
    )
    app.state.celery = make_celery(settings)
    app.state.readiness = ReadinessProbe(store=app.state.store, celery=app.state.celery)
    handlers.install(app)
    for module in (migrations, prompts, models, bundles, transfer, datasets):
        app.include_router(module.router, responses=ERROR_RESPONSES)
    app.include_router(health.router)
    # Pure ASGI middleware (no BaseHTTPMiddleware wrapping); the last added is the outermost, so
    # metrics count every answer, and the fast path's raw reads (no body) skip the body gate.
    app.add_middleware(
        handlers.BodyGateMiddleware,
        settings=settings,
        openapi=app.openapi,
        streamed=transfer.STREAMED_BODIES,
    )
    app.add_middleware(
        PromptFastPath,
        store=app.state.store,
        settings=settings,
        route=next(r for r in prompts.router.routes if getattr(r, "path", None) == fastpath.PATH),
        exception_handlers=app.exception_handlers,
    )
    app.add_middleware(metrics.MetricsMiddleware)
    return app


app = create_app()
