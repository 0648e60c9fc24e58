"""Tiny random models and a synthetic dataset with a learnable per-user signal."""

from __future__ import annotations

import pytest
import torch

from models.data import Splits, load_interactions, split_chronological
from models.foundation import FoundationModel
from models.prompts import PromptSet
from models.tasks import Task, get_task
from models.training import PromptTrainingConfig, train_prompts


@pytest.fixture(scope="session")
def tiny_llama() -> FoundationModel:
    return FoundationModel.load("tiny-llama", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_gemma() -> FoundationModel:
    return FoundationModel.load("tiny-gemma", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def rating() -> Task:
    return get_task("rating")


@pytest.fixture(scope="session")
def tiny_splits() -> Splits:
    rows = load_interactions("synthetic-tiny", task="rating")
    return split_chronological(rows, n_test=4, n_val=4, max_train=16)


@pytest.fixture(scope="session")
def source_set(tiny_llama: FoundationModel, rating: Task, tiny_splits: Splits) -> PromptSet:
    """Prompts trained on the tiny source model: they carry the synthetic per-user signal."""
    config = PromptTrainingConfig(epochs=8, lr=5e-2, head_lr=1e-2, patience=8)
    return train_prompts(tiny_llama, rating, tiny_splits, config=config).prompt_set
