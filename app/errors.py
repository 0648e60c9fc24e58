"""Service errors. Each carries an HTTP status and a message that says what to fix."""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFoundError(ServiceError):
    status_code = 404
    code = "not_found"


class ConflictError(ServiceError):
    status_code = 409
    code = "conflict"


class InvalidInputError(ServiceError):
    status_code = 422
    code = "invalid_input"


class BrokerUnavailableError(ServiceError):
    """The task queue did not take a job's first task: the job was failed, never started."""

    status_code = 503
    code = "broker_unavailable"


class PayloadTooLargeError(ServiceError):
    status_code = 413
    code = "payload_too_large"


class IntegrityError(ServiceError):
    """A written prompt set whose read-back count or digest differs from what was written."""

    status_code = 500
    code = "integrity"
