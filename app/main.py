"""Assembles the API: settings, store, Celery client, handlers, middleware and routers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import handlers, metrics
from app.config import Settings, get_settings
from app.routes import datasets, health, migrations, models, prompts
from app.store import Store, connect_redis, connect_redis_async
from workers.celery_app import make_celery


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        store: Store = app.state.store
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
    app.state.store = Store(redis, write_batch=settings.write_batch, aredis=aredis)
    app.state.celery = make_celery(settings)
    handlers.install(app)
    # Pure ASGI middleware (no BaseHTTPMiddleware wrapping); the last added is the outermost, so
    # metrics also count the 413s of the body limit.
    app.add_middleware(handlers.BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(metrics.MetricsMiddleware)
    for module in (migrations, prompts, models, datasets, health):
        app.include_router(module.router)
    return app


app = create_app()
