"""The transfer benchmark end to end on a small population (its figures are not checked)."""

from __future__ import annotations

from pathlib import Path

from bench import transfer


def test_transfer_benchmark_round_trips_a_set(tmp_path: Path) -> None:
    out = tmp_path / "transfer.json"
    result = transfer.main(["--users", "300", "--out", str(out)])
    (row,) = result["rows"]
    assert row["users"] == 300 and row["digest_matches"]
    assert row["file_mb"] >= round(300 * 640 * 4 / 2**20, 1)  # the prompts and more
    assert out.exists()
