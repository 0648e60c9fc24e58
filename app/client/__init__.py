"""The service's Python client, for inference services (see the README, "The client").

Importing it needs neither FastAPI nor Celery: httpx, numpy, torch and safetensors here;
``app.client.direct`` adds redis, ``app.client.builders`` transformers.
"""

from app.client.contract import Bundle, Prompt
from app.client.errors import (
    BadRequest,
    ClientError,
    Conflict,
    ContractError,
    NotFound,
    PayloadTooLarge,
    ServerError,
    Unauthorized,
    Unavailable,
)
from app.client.http import AsyncPromptClient, Batch, PromptClient

__all__ = [
    "AsyncPromptClient",
    "BadRequest",
    "Batch",
    "Bundle",
    "ClientError",
    "Conflict",
    "ContractError",
    "NotFound",
    "PayloadTooLarge",
    "Prompt",
    "PromptClient",
    "ServerError",
    "Unauthorized",
    "Unavailable",
]
