"""Typed errors of the client: each carries the service's status, error code and message."""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """The service refused a request, or the client could not use its answer."""

    def __init__(self, detail: str, *, status: int = 0, code: str = "client") -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.code = code


class BadRequest(ClientError):
    """400 and 422: the request or the uploaded file needs fixing (``detail`` says how)."""


class Unauthorized(ClientError):
    """401 and 403: a missing or wrong token, or a read token on an admin route."""


class NotFound(ClientError):
    """404: an unknown model, version, user or job (``detail`` names what exists)."""


class Conflict(ClientError):
    """409: for example a set that is not sealed yet."""


class PayloadTooLarge(ClientError):
    """413: the body is over the service's limit."""


class Unavailable(ClientError):
    """503: the service's store is unreachable; retry later."""


class ServerError(ClientError):
    """Any other 5xx."""


class ContractError(ClientError):
    """A bundle, prompt or checkpoint that do not fit together (a consumer-side mistake)."""


class FormatError(BadRequest):
    """A value or set file that does not follow the wire format. The service raises it too, for
    what a caller sent, and answers it as 422 ``invalid_input``."""

    def __init__(self, detail: str, *, status: int = 422, code: str = "invalid_input") -> None:
        super().__init__(detail, status=status, code=code)


_BY_STATUS: dict[int, type[ClientError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: BadRequest,
    503: Unavailable,
}


def from_response(status: int, body: Any, text: str) -> ClientError:
    """The typed error for an error answer; ``body`` is its parsed JSON (or None)."""
    detail, code = text or f"HTTP {status}", "http_error"
    if isinstance(body, dict):
        detail = str(body.get("detail") or detail)
        code = str(body.get("error") or code)
    kind = _BY_STATUS.get(status, ServerError if status >= 500 else ClientError)
    return kind(detail, status=status, code=code)
