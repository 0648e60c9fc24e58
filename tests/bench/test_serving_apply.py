"""The serving and apply benchmarks run end to end on tiny sizes and write the documented JSON."""

from __future__ import annotations

import json
from pathlib import Path

from bench import apply, serving
from models import recipe
from tests.conftest import RedisClusterServer, RedisServer

BENCH_DB = 3  # apart from the store (0) and broker (1) databases other tests flush

PHASES = {
    "raw_redis_get",
    "raw_redis_pipeline",
    "raw_client_get",
    "direct_redis",
    "minimal_fastapi",
    "api_single",
    "api_batch",
    "api_batch_safetensors",
}
HTTP = {p for p in PHASES if p.startswith(("api", "minimal"))}
PHASE_FIELDS = {
    "requests",
    "errors",
    "seconds",
    "items_per_request",
    "requests_per_s",
    "items_per_s",
    "latency_ms",
    "cpu_seconds",
}
TINY = [
    "--users",
    "60",
    "--concurrency",
    "2",
    "--seconds",
    "1",
    "--warmup",
    "0",
    "--batch-size",
    "8",
]


def test_serving_measures_redis_the_floor_and_the_api_in_one_run(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    out = tmp_path / "serving.json"
    argv = [
        "--out",
        str(out),
        *TINY,
        "--api-workers",
        "1,2",
        "--redis-url",
        redis_server.url(BENCH_DB),
    ]
    serving.main(argv)
    result = json.loads(out.read_text())
    assert result["config"]["users"] == 60
    assert result["config"]["prompt_shape"] == [1, 640]
    assert result["config"]["value_bytes"] == 640 * 4
    assert result["machine"]["cpu_count"] >= 1
    assert result["note"]
    assert set(result["measurements"]) == PHASES | {f"{p}_2_workers" for p in HTTP}
    for name, m in result["measurements"].items():
        assert m.keys() >= PHASE_FIELDS, name
        assert m["errors"] == 0, name
        assert m["requests"] > 0 and m["requests_per_s"] > 0, name
        lat = m["latency_ms"]
        assert 0 < lat["p50"] <= lat["p99"] <= lat["p999"] <= lat["max"], name
        assert m["cpu_seconds"]["load_generator"] > 0, name
        if name.removesuffix("_2_workers") in HTTP:
            assert m["cpu_seconds"]["api"] > 0, name
    for name in ("raw_redis_pipeline", "api_batch", "api_batch_safetensors"):
        m = result["measurements"][name]
        assert m["items_per_request"] == 8
        assert abs(m["items_per_s"] - m["requests_per_s"] * 8) <= 1
    ratios = result["ratios"]
    m = result["measurements"]
    single, floor = m["api_single"]["requests_per_s"], m["minimal_fastapi"]["requests_per_s"]
    assert abs(ratios["api_single_vs_minimal_fastapi"] - single / floor) < 1e-3
    assert ratios["api_single_2_workers_vs_1"] is not None
    direct, plain = m["direct_redis"]["requests_per_s"], m["raw_client_get"]["requests_per_s"]
    assert abs(ratios["direct_redis_vs_raw_client_get"] - direct / plain) < 1e-3
    memory = {(r["width"], r["dtype"]): r for r in result["memory_per_prompt"]}
    assert set(memory) == {(w, d) for w in (576, 640) for d in ("float32", "float16")}
    for (width, dtype), row in memory.items():
        assert row["value_bytes"] == width * (4 if dtype == "float32" else 2)
        assert row["overhead"] > 1  # a key and Redis's bookkeeping come on top of the bytes


def test_serving_on_a_redis_cluster_reads_every_phase_without_errors(
    redis_cluster: RedisClusterServer, tmp_path: Path
) -> None:
    redis_cluster.flush()
    out = tmp_path / "serving-cluster.json"
    argv = [
        "--out",
        str(out),
        *TINY,
        "--api-workers",
        "1",
        "--redis-url",
        redis_cluster.url(),
        "--cluster",
    ]
    result = serving.main(argv)
    assert "Cluster" in result["config"]["redis"]
    assert set(result["measurements"]) == PHASES
    for name, m in result["measurements"].items():
        assert m["errors"] == 0 and m["requests"] > 0, name


def test_apply_times_the_chunk_path_per_chunk_size_and_cleans_up(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    out = tmp_path / "apply.json"
    url = redis_server.url(BENCH_DB)
    apply.main(
        [
            "--out",
            str(out),
            "--users",
            "300",
            "--chunk-sizes",
            "64,128",
            "--repeat",
            "2",
            "--redis-url",
            url,
        ]
    )
    result = json.loads(out.read_text())
    cfg = result["config"]
    assert cfg["users"] == 300
    assert cfg["adapter"]["d_in"] == 576 and cfg["adapter"]["d_out"] == 640
    assert cfg["adapter"]["input_rank"] == recipe.ALL_USERS.input_rank
    assert cfg["value_bytes"] == {"source": 576 * 4, "target": 640 * 4}
    assert result["machine"]["cpu_count"] >= 1
    assert result["machine"]["torch_cpu_capability"]  # e.g. AVX512, AVX2, DEFAULT
    assert [r["chunk_size"] for r in result["runs"]] == [64, 128]
    assert [r["chunks"] for r in result["runs"]] == [5, 3]
    for run in result["runs"]:
        for step in ("plan", "chunk_path", "seal", "delete", "plan_map_seal"):
            assert run["users_per_s"][step] > 0, step
        assert len(run["chunk_path_users_per_s_rounds"]) == 2
        assert run["chunk_path_cpu_us_per_user"]["worker"] > 0
    assert result["best_chunk_size"] in (64, 128)
    assert result["peak_rss_mb"] > 0
    assert set(result["map_cpu_us_per_user"]) == {"adapter", "folded"}
    assert all(cost > 0 for cost in result["map_cpu_us_per_user"].values())

    from redis import Redis

    client = Redis.from_url(url)
    leftover = [
        key
        for name in ("bench-source", "bench-target")
        for key in client.scan_iter(match=f"pm:{{{name}:*", count=1000)
    ]
    client.close()
    assert leftover == []  # the benchmark deleted its sets


def test_apply_float16_halves_the_stored_bytes(redis_server: RedisServer, tmp_path: Path) -> None:
    out = tmp_path / "apply16.json"
    url = redis_server.url(BENCH_DB)
    result = apply.main(
        [
            "--out",
            str(out),
            "--users",
            "40",
            "--dtype",
            "float16",
            "--chunk-sizes",
            "16",
            "--repeat",
            "1",
            "--redis-url",
            url,
        ]
    )
    assert result["config"]["value_bytes"]["target"] == 640 * 2
