"""Python clients for iro-serve: `IroClient` (sync) and `AsyncIroClient` (asyncio), on httpx.

Requests and answers are the server's own pydantic schemas (`common.protocol`,
`common.admin_protocol`); errors are typed (`clients.errors`). Configuration defaults come from
`IRO_BASE_URL`, `IRO_API_KEY` and `IRO_ADMIN_KEY`. `clients.errors.ConnectError` and
`clients.errors.TimeoutError` are not re-exported here (the names would shadow builtins).

    >>> from clients import IroClient
    >>> client = IroClient("http://127.0.0.1:8000")
    >>> client.base_url
    'http://127.0.0.1:8000'
    >>> client.close()
"""

from clients import errors
from clients.base import BaseIroClient
from clients.client import AsyncIroClient, IroClient
from clients.errors import (
    APIStatusError, AuthenticationError, BadRequestError, ConflictError, InternalServerError, IroClientError,
    NotFoundError, NotServingError, PayloadTooLargeError, PermissionDeniedError, RateLimitError, ServiceUnavailableError,
    TransportError,
)
from clients.streaming import AsyncStream, Stream

__all__ = [
    "IroClient", "AsyncIroClient", "BaseIroClient", "Stream", "AsyncStream", "errors", "IroClientError",
    "APIStatusError", "BadRequestError", "AuthenticationError", "PermissionDeniedError", "NotFoundError",
    "ConflictError", "PayloadTooLargeError", "RateLimitError", "InternalServerError", "ServiceUnavailableError",
    "TransportError", "NotServingError",
]
