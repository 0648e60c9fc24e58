"""The client installs and imports without the service's stack."""

from __future__ import annotations

import subprocess
import sys

HEAVY = {
    "torch",
    "transformers",
    "fastapi",
    "celery",
    "uvicorn",
    "sklearn",
    "matplotlib",
    "redis",
    "typer",
    "app",
    "models",
    "workers",
}


def test_importing_the_client_loads_none_of_the_services_stack() -> None:
    code = (
        "import sys\n"
        "import prompt_migration_client, prompt_migration_client.operator\n"
        "import prompt_migration_client.peft, prompt_migration_client.setfile\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True
        ).stdout.split()
    )
    assert "prompt_migration_client" in loaded
    assert loaded & HEAVY == set()
