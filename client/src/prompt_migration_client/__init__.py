"""The prompt migration service's Python client, for inference services and operators.

Needs httpx, numpy and safetensors only. ``.direct`` (reads from the service's Redis) needs the
``direct`` extra, ``.builders`` (transformers and vLLM inputs) the ``builders`` extra, ``.cli``
the ``cli`` extra. The wire formats live here, and the service imports them: ``codec`` (prompt
values), ``setfile`` (a whole set in one file), ``batch`` (a batch read's answer), ``contract``
(the bundle's vocabulary), ``ids`` (the user id rule).
"""

from prompt_migration_client.batch import Batch
from prompt_migration_client.contract import Bundle, Prompt
from prompt_migration_client.errors import (
    BadRequest,
    ClientError,
    Conflict,
    ContractError,
    FormatError,
    NotFound,
    PayloadTooLarge,
    ServerError,
    Unauthorized,
    Unavailable,
)
from prompt_migration_client.http import AsyncPromptClient, PromptClient

__all__ = [
    "AsyncPromptClient",
    "BadRequest",
    "Batch",
    "Bundle",
    "ClientError",
    "Conflict",
    "ContractError",
    "FormatError",
    "NotFound",
    "PayloadTooLarge",
    "Prompt",
    "PromptClient",
    "ServerError",
    "Unauthorized",
    "Unavailable",
]
