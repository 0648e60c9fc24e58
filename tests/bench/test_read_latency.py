"""The read-latency benchmark on a small set: every window reads, writes and maps (its figures
are not checked)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import read_latency


def test_read_latency_reads_beside_writes_and_a_chunk_path_per_variant(tmp_path: Path) -> None:
    out = tmp_path / "read-latency.json"
    read_latency.main(
        [
            "--out",
            str(out),
            "--users",
            "500",
            "--source-users",
            "2000",
            "--variants",
            "idle:100,3:500",
            "--seconds",
            "2",
            "--repeat",
            "1",
            "--write-rate",
            "20",
        ]
    )
    result = json.loads(out.read_text())
    assert [(v["priority"], v["bulk_values"]) for v in result["variants"]] == [
        ("idle", 100),
        (3, 500),
    ]
    for variant in result["variants"]:
        (window,) = variant["rounds"]
        assert window["requests"] > 0 and window["errors"] == 0
        assert 0 < window["p50"] <= window["p99"]
        assert window["writes"] > 0
        assert window["chunk_path_users_per_s"] > 0
    for idle in result["idle"].values():
        assert idle["requests"] > 0 and idle["errors"] == 0
    assert result["writes_alone"]["writes"] > 0
