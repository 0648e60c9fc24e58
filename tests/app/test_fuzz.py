"""The whole API fuzzed from its own OpenAPI schema (schemathesis, property-based).

Every operation gets a bounded number of generated requests, with the admin token, against
the real test Redis holding sealed sets of the tiny models; routes that start jobs only queue
them (no worker runs here), so they stay cheap. Each response must not be a 5xx and must match
the documented status codes, content type, headers and body schema (the exceptions, and why,
are in the test).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from fastapi import FastAPI  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from pydantic import SecretStr  # noqa: E402
from redis import Redis  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from app.config import Settings  # noqa: E402
from app.main import create_app  # noqa: E402
from tests.conftest import ADMIN, READER, RedisServer, admin, make_settings, seed_set  # noqa: E402

EXAMPLES_PER_OPERATION = 25
# The schema does not depend on the settings; this app is never called, only described.
_DOCUMENT: dict[str, Any] = create_app(
    Settings(environment="test", admin_token=SecretStr(ADMIN), read_token=SecretStr(READER))
).openapi()
OPERATIONS = [
    (method.upper(), path)
    for path, methods in _DOCUMENT["paths"].items()
    for method in methods
    if method in ("get", "put", "post", "delete", "patch")
]
GENERATED: list[int] = []


@pytest.fixture(scope="module")
def fuzzed_app(redis_server: RedisServer) -> Iterator[FastAPI]:
    settings_ = make_settings(redis_server)
    Redis.from_url(settings_.redis_url).flushdb()
    app = create_app(settings_)
    for model in ("tiny-llama", "tiny-gemma"):
        seed_set(app.state.store, model=model, users=["u1", "u2", "196"], shape=(1, 8))
    yield app
    Redis.from_url(settings_.broker).flushdb()  # the queued jobs must reach no later worker
    print(f"\n[fuzz] {sum(GENERATED)} generated requests over {len(GENERATED)} operations")


@pytest.fixture(scope="module")
def api_schema(fuzzed_app: FastAPI) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_operation_answers_5xx_or_off_its_schema(
    api_schema: Any, method: str, path: str
) -> None:
    operation = api_schema[path][method]
    calls = []
    # A schema-valid request may still name an unknown model or break a business rule: those
    # are documented 4xx answers, not failures. /readyz is 503 by design here: no worker runs.
    excluded = [positive_data_acceptance]
    if path == "/readyz":
        excluded.append(not_a_server_error)

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def fuzz(case: Any) -> None:
        calls.append(1)
        case.call_and_validate(headers=admin(), excluded_checks=excluded)

    fuzz()
    GENERATED.append(len(calls))
