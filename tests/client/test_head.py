"""The client's numpy head against the service's torch heads, and its import without torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from prompt_migration_client.functions import ACTIVE, DEFAULT_MODEL, meta_key, values_prefix
from prompt_migration_client.head import apply_head

from app.store import keys
from models.contract import head_steps
from models.tasks import get_task


@pytest.mark.parametrize("task", ["rating", "binary"])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_numpy_head_gives_the_services_predictions(task: str, scale: float) -> None:
    spec = get_task(task)
    head = spec.make_head(mean_target=3.5 if task == "rating" else 0.3, seed=4)
    with torch.no_grad():
        for parameter in head.parameters():  # a trained head, not its initial one
            parameter.add_(torch.randn_like(parameter) * 0.5)
    logits = torch.randn(256, len(spec.labels), generator=torch.Generator().manual_seed(1))
    logits = logits * scale
    with torch.no_grad():
        service = spec.predict(head(logits))  # what the service's evaluation reports
    weights = {name: value.numpy() for name, value in head.state_dict().items()}
    ours = apply_head(head_steps(spec), logits.numpy(), weights)
    assert ours.dtype == np.float32
    # Both compute in float32 (BLAS may order sums differently): they differ by rounding, which
    # grows with the logits' size.
    np.testing.assert_allclose(ours, service.numpy(), rtol=1e-5, atol=1e-5 * scale)


def test_the_store_builds_the_keys_readers_hand_the_functions() -> None:
    assert (keys.ACTIVE, keys.DEFAULT_MODEL) == (ACTIVE, DEFAULT_MODEL)
    set_keys = keys.SetKeys("tiny-gemma", "3")
    assert (set_keys.meta, set_keys.values) == (
        meta_key("tiny-gemma", "3"),
        values_prefix("tiny-gemma", "3"),
    )


def test_reading_and_the_head_need_no_torch() -> None:
    code = (
        "import sys\n"
        "import prompt_migration_client, prompt_migration_client.operator\n"
        "import prompt_migration_client.direct, prompt_migration_client.peft\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    heavy = {
        "torch",
        "transformers",
        "fastapi",
        "celery",
        "sklearn",
        "matplotlib",
        "app",
        "models",
        "workers",
    }
    assert set(done.stdout.split()) & heavy == set()
