"""The README's configuration table names every setting, and only settings that exist."""

from __future__ import annotations

import re
from pathlib import Path

from app.config import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def documented_settings() -> set[str]:
    section = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `PM_")]
    return {name for row in rows for name in re.findall(r"`(PM_[A-Z_]+)`", row.split("|")[1])}


def test_the_configuration_table_matches_the_settings() -> None:
    settings = {f"PM_{name.upper()}" for name in Settings.model_fields}
    documented = documented_settings()
    assert not settings - documented, f"settings missing from the README: {settings - documented}"
    assert not documented - settings, f"README rows with no setting: {documented - settings}"
