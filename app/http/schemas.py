"""Request and response bodies of the API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from prompt_migration_client.ids import USER_ID_RULE, is_user_id
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from app.errors import InvalidInputError
from app.store import MODEL_NAME_PATTERN, USER_ID_PATTERN

StoredDtype = Annotated[
    Literal["float32", "float16"],
    Field(description="How the new set's prompt values are stored and served."),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Upper bounds on the fields that size a job's work and memory: beyond them a request is a
# mistake (or an attack) that would hold a worker for days or kill it for memory.
MAX_USERS = 10_000_000  # more users than any dataset the service trains on holds
MAX_WIDTH = 4096  # adapter hidden units, principal directions, examples per step
MAX_SEED = 2**32 - 1  # what every generator (torch, numpy) accepts
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, description="Random seed, 0 to 2**32 - 1.")]


# ---- models -------------------------------------------------------------------------------------


class ModelCreate(Strict):
    name: str = Field(pattern=MODEL_NAME_PATTERN, examples=["gemma-3-270m"])
    checkpoint: str | None = Field(
        default=None, description="Built-in name or checkpoint directory; defaults to `name`."
    )


class ModelOut(BaseModel):
    name: str
    checkpoint: str
    hidden_size: int | None = None
    registered_at: float
    active_version: str | None = None
    default: bool = False
    versions: list[dict[str, Any]] = []


class Activate(Strict):
    version: str = Field(min_length=1, max_length=32)
    default: bool = Field(
        default=False,
        description="Also serve this model to readers who name none (`?model=` omitted). "
        "Without it they keep their model: rolling back one model never switches another's "
        "readers.",
    )


class ActivateOut(BaseModel):
    model: str
    version: str
    previous_version: str | None
    default_model: str | None  # the model readers who name none get now


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
        default=None, ge=1, le=10_000,
        description="Train the adapter on each selected user's latest N interactions only: more "
        "users for the same cost. Default: 7 on a budget, all of the dataset's with strategy "
        "`all`.",
    )  # fmt: skip
    input_rank: int | None = Field(
        default=None, ge=1, le=MAX_WIDTH,
        description="Read only the source table's top N principal directions; needs more than N "
        "prompt vectors in the source set. Default: 64, or as many as the source set has.",
    )  # fmt: skip
    start_from_vocab_map: bool | None = Field(
        default=None,
        description="Start the adapter's linear path at the map between the models' token "
        "embeddings (true) or at zero (false, the default).",
    )  # fmt: skip
    distill_weight: float | None = Field(
        default=None, ge=0, le=1,
        description="Blend each training label with the source set's own prediction of it on the "
        "source model, this share of the prediction (0: labels alone); the rating task's "
        "cross-entropy fits the same blend of the label's digit and the source's distribution "
        "over the digits. Default: 0.8 on a budget, at one source-model pass per example; 0 "
        "with strategy `all`.",
    )  # fmt: skip


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
    )  # fmt: skip
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
    def _distinct(self) -> MigrationCreate:
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


class Job(BaseModel):
    """A migration or prompt-training job as the API reports it."""

    id: str
    kind: Literal["migration", "train"]
    state: str
    stage: str
    progress: dict[str, Any]
    request: dict[str, Any]
    target: dict[str, Any]
    metrics: dict[str, Any] = {}
    cost: dict[str, Any] = {}
    # The adapter and selection settings a migration ran, and what the recipe's rules chose.
    recipe: dict[str, Any] = {}
    # The bounded, seeded samples a migration fitted and scored on: the population's size, the
    # users of the adapter's input statistics and of selection, and the test users.
    sample: dict[str, Any] = {}
    gate: dict[str, Any] = {}
    error: str | None = None
    # Why a passed set was not promoted automatically (a newer set of the model is served).
    promotion_refused: str | None = None
    cancel_requested: bool = False
    created_at: float
    updated_at: float


class JobList(BaseModel):
    jobs: list[Job]


# ---- prompts ------------------------------------------------------------------------------------


class PromptJSON(BaseModel):
    user_id: str
    model: str
    version: str
    shape: list[int]
    dtype: str
    digest: str
    values: list[list[float]]


class PromptUpload(Strict):
    values: list[list[float]] = Field(description="prompt_length x hidden_size floats.")


class PromptWritten(BaseModel):
    user_id: str
    model: str
    version: str
    created: bool
    digest: str


# Documented with the id rule, checked by BatchRequest.checked_ids once the count is allowed.
_BatchUserId = Annotated[
    str, WithJsonSchema({"type": "string", "pattern": USER_ID_PATTERN, "maxLength": 128})
]


class BatchRequest(Strict):
    user_ids: list[_BatchUserId] = Field(
        min_length=1, description="At most PM_MAX_BATCH_USERS ids (default 1000)."
    )
    model: str | None = Field(default=None, pattern=MODEL_NAME_PATTERN)
    version: str | None = Field(
        default=None,
        max_length=32,
        description="Pin a version of `model` (default: its active one).",
    )

    @model_validator(mode="after")
    def _pinned(self) -> BatchRequest:
        if self.version is not None and self.model is None:
            raise ValueError("version pins a version of a model: give model as well")
        return self

    def checked_ids(self, *, max_users: int) -> list[str]:
        """The ids, counted before any is checked: a list over the limit costs one ``len``."""
        if len(self.user_ids) > max_users:
            raise InvalidInputError(
                f"{len(self.user_ids)} users requested; send at most {max_users} per request."
            )
        bad = [u for u in self.user_ids if not is_user_id(u)]
        if bad:
            raise InvalidInputError(
                f"invalid user ids {[b[:40] for b in bad[:5]]}; use {USER_ID_RULE}."
            )
        return self.user_ids


class BatchOut(BaseModel):
    model: str
    version: str
    shape: list[int]
    dtype: str
    encoding: Literal["base64"] = "base64"
    prompts: dict[str, str]
    missing: list[str]


class Imported(BaseModel):
    """A set file stored as a new sealed version."""

    model: str
    version: str
    count: int
    digest: str
    shape: list[int]
    dtype: str
    lineage: dict[str, Any]
    active: bool


class Erased(BaseModel):
    user_id: str
    keys_removed: int


# ---- datasets -----------------------------------------------------------------------------------


class DatasetCreate(Strict):
    name: str = Field(pattern=MODEL_NAME_PATTERN)
    path: str = Field(description="Absolute path of a JSONL file readable by the workers.")


class DatasetOut(BaseModel):
    name: str
    path: str | None = None
    builtin: bool
    registered_at: float | None = None


class Problem(BaseModel):
    field: str
    problem: str


class ErrorOut(BaseModel):
    """Every error's body: a code, what was wrong and how to fix it; ``problems`` per field."""

    error: str
    detail: str
    problems: list[Problem] | None = None


_ERROR_CODES = {
    400: "Bad request",
    401: "Missing or unknown token",
    403: "The token lacks the scope",
    404: "Unknown model, version, user, job or dataset",
    409: "Conflicts with the current state",
    413: "Body over the size limit",
    422: "Invalid input; `problems` names the fields",
    503: "Redis or the task queue unreachable; retry shortly",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text} for code, text in _ERROR_CODES.items()
}
