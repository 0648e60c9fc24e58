"""The floor for any Python API on this machine: FastAPI + redis.asyncio returning the bytes.

``GET /users/{user_id}/prompt`` reads ``PM_BENCH_KEY_PREFIX + user_id`` with one GET: no auth,
no version resolution, no seal check, no metrics. Run by bench/serving.py under the same uvicorn
options as the API.
"""

from __future__ import annotations

import os

from fastapi import FastAPI, Response
from redis.asyncio import Redis, RedisCluster

app = FastAPI()
cluster = os.environ.get("PM_REDIS_CLUSTER") == "true"
redis = (RedisCluster if cluster else Redis).from_url(os.environ["PM_REDIS_URL"])
prefix = os.environ["PM_BENCH_KEY_PREFIX"]


@app.get("/users/{user_id}/prompt")
async def prompt(user_id: str) -> Response:
    return Response(await redis.get(prefix + user_id), media_type="application/octet-stream")
