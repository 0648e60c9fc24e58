"""Request and response bodies of the API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from prompt_migration_client.ids import USER_ID_RULE, is_user_id
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from app.errors import InvalidInputError
from app.store import MODEL_NAME_PATTERN, USER_ID_PATTERN


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
