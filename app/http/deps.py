"""Annotated dependencies: settings, the store, the Celery app and the two token scopes."""

from __future__ import annotations

import hmac
from enum import StrEnum
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.config import Settings
from app.http.readiness import ReadinessProbe
from app.store import Store


class Scope(StrEnum):
    read = "read"
    admin = "admin"


class AuthError(Exception):
    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


_bearer = HTTPBearer(auto_error=False, description="`read` or `admin` token.")


# Every dependency here is ``async def``: none does I/O, so FastAPI calls them on the event loop
# instead of hopping to a worker thread for each (a sync dependency costs one thread-pool trip).


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


async def get_celery(request: Request) -> Celery:
    celery: Celery = request.app.state.celery
    return celery


async def get_readiness(request: Request) -> ReadinessProbe:
    probe: ReadinessProbe = request.app.state.readiness
    return probe


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
ReadinessDep = Annotated[ReadinessProbe, Depends(get_readiness)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _matches(token: str, expected: object) -> bool:
    secret = getattr(expected, "get_secret_value", lambda: "")()
    return bool(secret) and hmac.compare_digest(token.encode(), str(secret).encode())


def token_scope(settings: Settings, token: str | None) -> Scope:
    """The scope of a bearer token; AuthError (401) when it is missing or matches neither."""
    if not token:
        raise AuthError(401, "Missing bearer token; send `Authorization: Bearer <token>`.")
    # Both comparisons always run, so timing does not reveal which token matched.
    is_admin = _matches(token, settings.admin_token)
    is_read = _matches(token, settings.read_token)
    if is_admin:
        return Scope.admin
    if is_read:
        return Scope.read
    raise AuthError(401, "Invalid bearer token; use the read or admin token the service printed.")


def _token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials if credentials is not None else None


async def require_read(settings: SettingsDep, credentials: Credentials) -> Scope:
    return token_scope(settings, _token(credentials))


async def require_admin(settings: SettingsDep, credentials: Credentials) -> Scope:
    if token_scope(settings, _token(credentials)) is not Scope.admin:
        raise AuthError(403, "This route writes or starts jobs and needs the admin token.")
    return Scope.admin


ReaderDep = Annotated[Scope, Depends(require_read)]
AdminDep = Annotated[Scope, Depends(require_admin)]
