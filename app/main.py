"""Assembles the API: settings, store, Celery client, handlers, middleware and routers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import handlers, metrics
from app.config import Settings, get_settings
from app.routes import datasets, health, migrations, models, prompts
from app.store import Store, connect_redis
from workers.celery_app import make_celery


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        app.state.store.redis.close()

    app = FastAPI(
        title="Prompt migration service",
        summary="Migrates per-user soft prompts to a new foundation model and serves them.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    redis = connect_redis(settings.redis_url, timeout_s=settings.redis_timeout_s)
    app.state.store = Store(redis, write_batch=settings.write_batch)
    app.state.celery = make_celery(settings)
    handlers.install(app)
    app.middleware("http")(handlers.body_limit(settings.max_body_bytes))
    app.middleware("http")(metrics.observe)
    for module in (migrations, prompts, models, datasets, health):
        app.include_router(module.router)
    return app


app = create_app()
