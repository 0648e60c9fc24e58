"""A consumer outside the ML core gets the quality the service reported, on the real checkpoints.

A real worker trains a small MovieLens population's prompts on each real model (a job, as an
operator runs it); the client then predicts every test rating from HTTP answers alone (the
bundle, the head and each user's prompt) and the checkpoint, and must match the service's own
evaluation, prediction by prediction and in RMSE. The vLLM builder's ``[seq, d]`` tensor, fed to
transformers as ``inputs_embeds``, must give the service's label logits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from prompt_migration_client import PromptClient
from prompt_migration_client.builders import InputBuilder, Predictor
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.config import Settings
from app.main import create_app
from app.store import Store
from models import assets
from models.checkpoints import REAL_MODELS, resolve_checkpoint
from models.data import Splits, load_interactions, split_chronological
from models.evaluation import predict_set
from models.foundation import FoundationModel, default_dtype
from models.tasks import get_task
from tests.conftest import READER, Worker, admin
from tests.workers.helpers import register, wait_done
from workers.pipeline import load_set

pytestmark = pytest.mark.integration

USERS, TRAIN_PER_USER = 4, 5
JOB = {
    "dataset": "movielens-100k",
    "task": "rating",
    "max_users": USERS,
    "epochs": 1,
    "max_train_per_user": TRAIN_PER_USER,
    "seed": 0,
}


class Service(NamedTuple):
    client: TestClient
    store: Store
    jobs: dict[str, dict[str, Any]]  # model -> its finished training job


@pytest.fixture(scope="module")
def service(redis_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A real worker and the API; each real model's prompts trained by a job."""
    from redis import Redis

    from tests.conftest import make_settings

    for name in REAL_MODELS:
        if not (assets.model_dir(name) / "config.json").exists():
            pytest.fail(f"{name} is missing from the asset cache: run `make setup` first.")
    settings: Settings = make_settings(redis_server)
    for url in (settings.redis_url, settings.broker):
        Redis.from_url(url).flushdb()
    worker = Worker(settings, tmp_path_factory.mktemp("worker") / "worker.log")
    worker.start()
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            register(client, *REAL_MODELS)
            jobs = {name: train(client, name, worker.log) for name in REAL_MODELS}
            yield Service(client, client.app.state.store, jobs)  # type: ignore[attr-defined]
    finally:
        worker.stop()


def train(client: TestClient, name: str, log: Path) -> dict[str, Any]:
    response = client.post(f"/models/{name}/train", json=JOB, headers=admin())
    assert response.status_code == 201, response.text
    done = wait_done(client, response.json()["id"], timeout=900, worker_log=log)
    assert done["state"] == "succeeded", done
    return done


def held_out() -> Splits:
    rows = load_interactions("movielens-100k", task="rating", max_users=USERS, seed=0)
    return split_chronological(rows, max_train=TRAIN_PER_USER)


def checkpoint(name: str) -> tuple[Any, Any]:
    """The checkpoint as a consumer loads it, in the dtype the worker computes in here."""
    path = resolve_checkpoint(name)
    dtype = default_dtype(torch.device("cpu"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(path)


def tolerance() -> float:
    """bf16 keeps 8 bits of mantissa: a rating near 4 may move by a few hundredths."""
    return 0.05 if default_dtype(torch.device("cpu")) == torch.bfloat16 else 1e-3


@pytest.mark.parametrize("name", REAL_MODELS)
def test_client_predictions_and_rmse_equal_the_services(service: Service, name: str) -> None:
    job = service.jobs[name]
    version = job["target"]["version"]
    api = PromptClient(token=READER, http=service.client)
    model, tokenizer = checkpoint(name)
    predictor = Predictor(api, model_name=name, version=version, model=model, tokenizer=tokenizer)
    assert predictor.bundle.doc["metrics"] == job["metrics"]
    test = held_out().test
    pairs = [(u, i) for u, items in test.items() for i in items]  # the evaluation's order
    ours = np.array([predictor.predict(u, i.item_text) for u, i in pairs])
    targets = np.array([i.label for _, i in pairs])
    service_model = FoundationModel.load(name, device="cpu")
    theirs = predict_set(
        service_model, get_task("rating"), load_set(name, version, db=service.store), test
    )
    assert theirs.user_ids == [u for u, _ in pairs]
    assert np.array_equal(theirs.targets, targets)
    by_service = theirs.predictions
    max_diff = float(np.abs(ours - by_service).max())
    client_rmse = float(np.sqrt(np.mean((ours - targets) ** 2)))
    job_rmse = float(job["metrics"]["test"]["rmse"])
    print(
        json.dumps(
            {
                "model": name,
                "examples": len(pairs),
                "max_abs_prediction_diff": max_diff,
                "client_rmse": client_rmse,
                "job_rmse": job_rmse,
                "dtype": str(model.dtype),
            }
        )
    )
    assert job["metrics"]["test"]["n_interactions"] == len(pairs)
    assert max_diff <= tolerance()
    assert abs(client_rmse - job_rmse) <= tolerance()
    assert np.ptp(ours) > 1e-3  # the users' prompts and the items do move the prediction


def test_vllm_tensor_gives_the_services_logits_on_gemma(service: Service) -> None:
    name = "gemma-3-270m"
    version = service.jobs[name]["target"]["version"]
    api = PromptClient(token=READER, http=service.client)
    bundle = api.bundle(name, version)
    assert bundle.input_scale == pytest.approx(640**0.5)
    model, tokenizer = checkpoint(name)
    builder = InputBuilder(bundle, model=model, tokenizer=tokenizer)
    service_model = FoundationModel.load(name, device="cpu")
    task = get_task("rating")
    answer = service_model.answer_tokens(task.template.suffix, task.labels)
    test = held_out().test
    worst = 0.0
    for user in sorted(test)[:2]:
        prompt = api.prompt(user, model=name, version=version)
        for item in test[user][:2]:
            embeds = builder.prompt_embeds(prompt.values, item.item_text)  # vLLM's [seq, d]
            assert embeds.ndim == 2 and embeds.shape[1] == 640
            ours = builder.label_logits_of(embeds)
            prefix = task.template.prefix_for(item.item_text)
            theirs = service_model.label_logits(
                [prefix], torch.from_numpy(prompt.values)[None], answer=answer
            )[0]
            worst = max(worst, float((ours - theirs).abs().max()))
    print(json.dumps({"model": name, "max_abs_label_logit_diff_vllm_tensor": worst}))
    assert worst <= 20 * tolerance()  # logits are tens in size; a prediction's tolerance times 20
