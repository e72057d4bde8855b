"""Errors raised by `IroClient` and `AsyncIroClient`.

    IroClientError                   base; `.request` is the httpx.Request that failed
    ├── NotServingError              wait_value/wait_policy: the version was refused (`.refused`) or not
    │                                served before the deadline; `.status` is the last status seen
    ├── TransportError               no HTTP answer (wraps the httpx exception as __cause__)
    │   ├── ConnectError             could not connect (retried)
    │   └── TimeoutError             connect/read/write/pool timeout (connect timeouts retried)
    └── APIStatusError               the server answered with an error; `.response`, `.status_code`,
        │                            and the parsed OpenAI error body: `.message`, `.type`, `.param`, `.code`
        ├── BadRequestError          400 (validation, bad guidance, context too long)
        ├── AuthenticationError      401 (missing or wrong key)
        ├── PermissionDeniedError    403 (admin route without the admin key)
        ├── NotFoundError            404 (unknown model, value or version)
        ├── ConflictError            409
        ├── PayloadTooLargeError     413
        ├── RateLimitError           429 (server queue full; retried)
        └── InternalServerError      5xx
            └── ServiceUnavailableError  503 (engine starting, value swapping; retried)

An error event inside a stream (`data: {"error": {...}}`) raises the same classes, chosen from the
error `type` (the HTTP status of a stream is already 200).

    >>> error_class(404).__name__, error_class(502).__name__, error_class(418).__name__
    ('NotFoundError', 'InternalServerError', 'APIStatusError')
"""

from __future__ import annotations

import httpx

from common.admin_protocol import RefusedVersion, RegistryEntryStatus
from common.errors import ErrorInfo

__all__ = [
    "IroClientError", "NotServingError", "TransportError", "ConnectError", "TimeoutError", "APIStatusError", "BadRequestError",
    "AuthenticationError", "PermissionDeniedError", "NotFoundError", "ConflictError", "PayloadTooLargeError",
    "RateLimitError", "InternalServerError", "ServiceUnavailableError", "error_class", "status_for_type",
]


class IroClientError(Exception):
    """Base of every client error; `request` is the request that failed."""

    def __init__(self, message: str, *, request: httpx.Request):
        super().__init__(message)
        self.message = message
        self.request = request


class NotServingError(IroClientError):
    """A wait for a version (`wait_value`, `wait_policy`) is over without it serving: the server
    refused it (`refused`: version, reason, time) or the deadline passed (`refused` is None).
    `status` is the last status the server gave."""

    def __init__(self, message: str, *, request: httpx.Request, status: RegistryEntryStatus,
                 refused: RefusedVersion | None = None):
        super().__init__(message, request=request)
        self.status = status
        self.refused = refused


class TransportError(IroClientError):
    """The request got no HTTP answer (network failure, protocol error, timeout)."""


class ConnectError(TransportError):
    """The server could not be reached (refused, DNS, reset before an answer)."""


class TimeoutError(TransportError):  # noqa: A001 - mirrors httpx.TimeoutException; use errors.TimeoutError
    """A connect, read, write or pool timeout expired."""


class APIStatusError(IroClientError):
    """The server answered with an error status (or sent an error event in a stream)."""

    def __init__(self, message: str, *, request: httpx.Request, response: httpx.Response,
                 body: ErrorInfo | None = None, status_code: int | None = None):
        super().__init__(message, request=request)
        self.response = response
        self.body = body
        self.status_code = status_code if status_code is not None else response.status_code

    @property
    def type(self) -> str | None:
        return self.body.type if self.body else None

    @property
    def param(self) -> str | None:
        return self.body.param if self.body else None

    @property
    def code(self) -> str | None:
        return self.body.code if self.body else None

    def __str__(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in (("param", self.param), ("code", self.code)) if v)
        return f"{self.status_code} {self.message}" + (f" ({extra})" if extra else "")


class BadRequestError(APIStatusError):
    """400: the request is invalid; `param` names the offending field."""


class AuthenticationError(APIStatusError):
    """401: missing or wrong API key."""


class PermissionDeniedError(APIStatusError):
    """403: the key is valid but not allowed here (value admin routes need the admin key)."""


class NotFoundError(APIStatusError):
    """404: unknown model, value, version or route."""


class ConflictError(APIStatusError):
    """409: the operation conflicts with the server's state."""


class PayloadTooLargeError(APIStatusError):
    """413: the request body is over the server's limit."""


class RateLimitError(APIStatusError):
    """429: the server's queue is full; retried with backoff."""


class InternalServerError(APIStatusError):
    """5xx: the server failed."""


class ServiceUnavailableError(InternalServerError):
    """503: recoverable unavailability (engine starting, value swapping); retried with backoff."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
    409: ConflictError, 413: PayloadTooLargeError, 422: BadRequestError, 429: RateLimitError,
    503: ServiceUnavailableError,
}
_STATUS_BY_TYPE = {
    "invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
    "rate_limit_error": 429, "service_unavailable": 503, "server_error": 500,
}


def error_class(status: int) -> type[APIStatusError]:
    """The error class for an HTTP status."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return InternalServerError if status >= 500 else APIStatusError


def status_for_type(error_type: str | None, code: str | None = None) -> int:
    """The HTTP status matching an OpenAI error `type` (for error events inside a stream)."""
    if code in ("model_not_found", "not_found", "value_not_found"):
        return 404
    return _STATUS_BY_TYPE.get(error_type or "", 500)
