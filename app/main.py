"""Assembles the API: settings, store, Celery client, handlers, middleware and routers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app import handlers, metrics
from app.config import Settings, get_settings
from app.routes import datasets, health, migrations, models, prompts
from app.store import Store
from workers.celery_app import make_celery


def connect_redis(settings: Settings) -> Redis:
    # Fail fast when Redis is down (the API answers 503) and reconnect by itself later.
    return Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )


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
    app.state.store = Store(connect_redis(settings), write_batch=settings.write_batch)
    app.state.celery = make_celery(settings)
    handlers.install(app)
    app.middleware("http")(handlers.body_limit(settings.max_body_bytes))
    app.middleware("http")(metrics.observe)
    for module in (migrations, prompts, models, datasets, health):
        app.include_router(module.router)
    return app


app = create_app()
