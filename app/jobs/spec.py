"""A job's specification: the request the API validates and stores, and the workers read back
(``Job.spec`` in workers/context.py) with the same types and defaults."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from app.store import MODEL_NAME_PATTERN

# Read back from a job record: the request was validated when the job was made.
STORED = {"stored": True}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


StoredDtype = Annotated[
    Literal["float32", "float16"],
    Field(description="How the new set's prompt values are stored and served."),
]


# Upper bounds on the fields that size a job's work and memory: beyond them a request is a
# mistake (or an attack) that would hold a worker for days or kill it for memory.
MAX_USERS = 10_000_000  # more users than any dataset the service trains on holds
MAX_WIDTH = 4096  # adapter hidden units, principal directions, examples per step
MAX_SEED = 2**32 - 1  # what every generator (torch, numpy) accepts
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, description="Random seed, 0 to 2**32 - 1.")]


# ---- prompt training ---------------------------------------------------------------------------


class TrainRequest(Strict):
    dataset: str = Field(examples=["movielens-100k"])
    task: Literal["rating", "binary"] = "rating"
    max_users: int | None = Field(default=None, ge=1, le=MAX_USERS)
    max_train_per_user: int = Field(default=30, ge=1, le=10_000)
    epochs: int = Field(default=10, ge=1, le=1000)
    prompt_length: int = Field(default=1, ge=1, le=64)
    lr: float | None = Field(default=None, gt=0)
    activate: bool = True
    dtype: StoredDtype = "float32"
    seed: Seed = 0


# ---- migrations ---------------------------------------------------------------------------------


class SourceRef(Strict):
    model: str = Field(pattern=MODEL_NAME_PATTERN)
    version: str | None = Field(default=None, description="Defaults to the active version.")


class Selection(Strict):
    strategy: Literal["puma", "random", "all"] = "puma"
    budget: int | None = Field(
        default=None, ge=1, le=MAX_USERS, description="Users trained on; None = all."
    )
    post_stratify: bool = Field(
        default=False,
        description="puma: weigh each selected user's examples by its cluster's population share "
        "over its selection share, so small clusters' floors do not skew the adapter's loss "
        "(not measured to help yet; see bench/README.md).",
    )


class AdapterOptions(Strict):
    """Each option left out takes the measured recipe's value (models/recipe.py): the job's
    `recipe` field shows what it ran."""

    epochs: int | None = Field(default=None, ge=1, le=1000)
    hidden: int | None = Field(default=None, ge=1, le=MAX_WIDTH)
    lr: float | None = Field(default=None, gt=0)
    batch_size: int | None = Field(default=None, ge=1, le=MAX_WIDTH)
    max_train_per_user: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="Train the adapter on each selected user's latest N interactions only: more "
        "users for the same cost. Default: 7 on a budget, all of the dataset's with strategy "
        "`all`.",
    )
    input_rank: int | None = Field(
        default=None,
        ge=1,
        le=MAX_WIDTH,
        description="Read only the source table's top N principal directions; needs more than N "
        "prompt vectors in the source set. Default: 64, or as many as the source set has.",
    )
    start_from_vocab_map: bool | None = Field(
        default=None,
        description="Start the adapter's linear path at the map between the models' token "
        "embeddings (true) or at zero (false, the default).",
    )
    distill_weight: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Blend each training label with the source set's own prediction of it on the "
        "source model, this share of the prediction (0: labels alone); the rating task's "
        "cross-entropy fits the same blend of the label's digit and the source's distribution "
        "over the digits. Default: 0.8 on a budget, at one source-model pass per example; 0 "
        "with strategy `all`.",
    )


class QualityGate(Strict):
    tolerance: float | None = Field(
        default=None, ge=0, description="Allowed worsening of the primary metric vs the source."
    )


class MigrationCreate(Strict):
    sources: list[SourceRef] = Field(min_length=1, max_length=8)
    target: str = Field(pattern=MODEL_NAME_PATTERN)
    dataset: str = Field(examples=["movielens-100k"])
    method: Literal["adapter", "instant"] = Field(
        default="adapter",
        description="`adapter`: PUMA, an adapter trained through the target on the selected "
        "users. `instant`: no training and no ratings: the map between the models' token "
        "embeddings, with the source head refitted to the target on the dataset's item texts; "
        "ready in seconds, less accurate (see the README).",
    )
    max_users: int | None = Field(default=None, ge=1, le=MAX_USERS)
    max_train_per_user: int = Field(
        default=30, ge=1, le=10_000, description="Most recent training interactions per user."
    )
    selection: Selection = Selection()
    adapter: AdapterOptions = AdapterOptions()
    quality_gate: QualityGate = QualityGate()
    auto_promote: bool = True
    chunk_size: int | None = Field(default=None, ge=1, le=100_000)
    dtype: StoredDtype = "float32"
    seed: Seed = 0

    @model_validator(mode="after")
    def _distinct(self, info: ValidationInfo) -> MigrationCreate:
        if info.context == STORED:
            return self
        keys = [(s.model, s.version) for s in self.sources]
        if len(set(keys)) != len(keys):
            raise ValueError("sources lists the same prompt set twice; list each set once")
        if any(s.model == self.target for s in self.sources):
            raise ValueError(
                "source and target are the same model; a migration makes a set for a different "
                "model (to retrain the same model, use POST /models/{name}/train)"
            )
        trains = {"selection", "adapter"} & self.model_fields_set
        if self.method == "instant" and trains:
            raise ValueError(
                f"{' and '.join(sorted(trains))} apply to adapter training, which an instant "
                "migration does not do: drop them, or use method 'adapter'"
            )
        return self
