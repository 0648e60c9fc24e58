"""Every route refuses a missing or wrong token, and a read token where admin is needed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from app.main import create_app
from tests.conftest import READER

PUBLIC = {"/healthz", "/readyz", "/metrics"}
READ_ROUTES = {
    ("GET", "/users/{user_id}/prompt"),
    ("POST", "/prompts/batch"),
    ("GET", "/migrations"),
    ("GET", "/migrations/{job_id}"),
    ("GET", "/models"),
    ("GET", "/datasets"),
    ("GET", "/models/{name}/versions/{version}/bundle"),
    ("GET", "/models/{name}/versions/{version}/head"),
}


def _api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):  # an included router (FastAPI >= 0.16x)
            yield from _api_routes(route.original_router.routes)


def _routes() -> list[tuple[str, str]]:
    found = []
    for route in _api_routes(create_app().routes):
        if route.path not in PUBLIC:
            found += [(method, route.path) for method in sorted(route.methods or ())]
    return found


ROUTES = _routes()
ADMIN_ROUTES = [r for r in ROUTES if r not in READ_ROUTES]


def _url(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "abc", path)


def test_every_route_is_classified() -> None:
    assert set(READ_ROUTES) <= set(ROUTES)
    assert len(ADMIN_ROUTES) == 11  # export and import of whole sets included


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_missing_token_is_401(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, _url(path))
    assert response.status_code == 401
    assert "token" in response.json()["detail"]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_wrong_token_is_401(client: TestClient, method: str, path: str) -> None:
    headers = {"Authorization": "Bearer not-the-token"}
    assert client.request(method, _url(path), headers=headers).status_code == 401


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_read_token_on_admin_route_is_403(client: TestClient, method: str, path: str) -> None:
    headers = {"Authorization": f"Bearer {READER}"}
    response = client.request(method, _url(path), headers=headers)
    assert response.status_code == 403
    assert "admin" in response.json()["detail"]


def test_public_routes_answer_without_token(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/metrics").status_code == 200
    assert client.get("/docs").status_code == 200
