"""Redis down: 503 with a clear message, never 500; service recovers when Redis is back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from app.main import create_app
from tests.conftest import RedisServer, admin, make_settings, reader, seed_set


def test_503_while_redis_is_down_then_recovers(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        app = create_app(make_settings(server))
        with TestClient(app, raise_server_exceptions=False) as client:
            seed_set(app.state.store, model="m-a", users=["u1"])
            assert client.get("/users/u1/prompt", headers=reader()).status_code == 200
            server.stop()
            for method, path in [
                ("GET", "/users/u1/prompt"),
                ("GET", "/models"),
                ("GET", "/migrations"),
                ("POST", "/prompts/batch"),
            ]:
                kwargs: dict[str, Any] = {"json": {"user_ids": ["u1"]}} if method == "POST" else {}
                response = client.request(method, path, headers=reader(), **kwargs)
                assert response.status_code == 503, response.text
                assert "Redis" in response.json()["detail"]
            erase = client.delete("/users/u1", headers=admin())
            assert erase.status_code == 503
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["ready"] is False
            server.start()  # same port, empty data
            seed_set(app.state.store, model="m-a", users=["u1"])
            assert client.get("/users/u1/prompt", headers=reader()).status_code == 200
    finally:
        server.stop()
