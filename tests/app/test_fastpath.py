"""The raw read's fast path answers exactly as the documented route does, on every outcome."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.http.fastpath import PromptFastPath
from app.store import Store
from tests.conftest import admin, reader, seed_set

# Headers that differ between two answers for reasons other than the code path.
VOLATILE = {"date", "server"}


@pytest.fixture
def route_only(settings: Settings, client: TestClient) -> Iterator[TestClient]:
    """The same API on the same Redis without the fast path: every read goes to the route."""
    from app.main import create_app

    app = create_app(settings)
    app.user_middleware = [m for m in app.user_middleware if m.cls is not PromptFastPath]
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def _same_answer(fast: TestClient, route: TestClient, url: str, headers: dict[str, str]) -> int:
    a, b = fast.get(url, headers=headers), route.get(url, headers=headers)
    assert a.status_code == b.status_code, url
    assert a.content == b.content, url
    strip = lambda h: {k: v for k, v in h.items() if k not in VOLATILE}  # noqa: E731
    assert strip(a.headers) == strip(b.headers), url
    return a.status_code


def test_every_outcome_of_a_raw_read_matches_the_route(
    client: TestClient, route_only: TestClient, store: Store
) -> None:
    version, _ = seed_set(store, model="m-a", users=["u1", "u2"])
    seed_set(store, model="m-b", users=["u1"], activate=False)
    etag = client.get("/users/u1/prompt", headers=reader()).headers["etag"]
    cases = [
        ("/users/u1/prompt", reader(), 200),
        ("/users/u1/prompt?format=raw&model=m-a", admin(), 200),
        (f"/users/u2/prompt?model=m-a&version={version}", reader(), 200),
        ("/users/u1/prompt?unknown=1", reader(), 200),
        ("/users/u1/prompt", reader() | {"If-None-Match": f'"x", {etag}'}, 304),
        ("/users/nobody/prompt", reader(), 404),
        ("/users/u1/prompt?model=m-zzz", reader(), 404),
        ("/users/u1/prompt?model=m-b", reader(), 404),
        ("/users/u1/prompt?model=m-a&version=99", reader(), 404),
        ("/users/u1/prompt?model=", reader(), 422),
        ("/users/u1/prompt?model=-bad", reader(), 422),
        (f"/users/u1/prompt?version={'9' * 33}", reader(), 422),
        ("/users/u1/prompt?format=xml", reader(), 422),
        ("/users/u1/prompt?format=json", reader(), 200),
        ("/users/u1/prompt?token=x", {}, 401),
        ("/users/u1/prompt?bad-token", {"Authorization": "Bearer nope"}, 401),
        ("/users/u1/prompt?basic", {"Authorization": "Basic " + reader()["Authorization"]}, 401),
    ]
    for url, headers, status in cases:
        assert _same_answer(client, route_only, url, headers) == status, url


def test_fast_path_reads_count_under_the_route_in_metrics(client: TestClient, store: Store) -> None:
    seed_set(store, model="m-a", users=["u1"])
    for _ in range(3):
        assert client.get("/users/u1/prompt", headers=reader()).status_code == 200
    assert client.get("/users/nobody/prompt", headers=reader()).status_code == 404
    text = client.get("/metrics").text
    route = 'method="GET",route="/users/{user_id}/prompt"'
    counts = {
        status: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("pm_http_requests_total{") and route in line
        for status in ("200", "404")
        if f'status="{status}"' in line
    }
    assert counts["200"] >= 3 and counts["404"] >= 1
