"""One error shape for the whole API and one place mapping exceptions to HTTP status codes.

    IroError                     base; carries message, param, code and keyword context
    ├── InvalidRequestError      400 invalid_request_error
    │   └── GuidanceError        400, param names the guidance field
    ├── AuthenticationError      401
    ├── PermissionDeniedError    403
    ├── NotFoundError            404 (unknown model, value or version)
    ├── ConflictError            409
    ├── PayloadTooLargeError     413
    ├── OverloadedError          429 (queue full; retry later)
    ├── QuotaExceededError       429 insufficient_quota (a per-key quota of files or batches; not retried)
    ├── UnavailableError         503 recoverable (engine starting, value swapping)
    └── EngineDeadError          503 fatal (the engine process died)
"""

from __future__ import annotations

from typing import Any

from common.errors import ErrorInfo, ErrorResponse
from common.protocol import UNICODE_ERROR


class IroError(Exception):
    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, **context: Any):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.context = context

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.error_type, param=self.param, code=self.code))


class InvalidRequestError(IroError):
    status_code = 400
    error_type = "invalid_request_error"


class GuidanceError(InvalidRequestError):
    """Bad `guidance` settings; `param` is e.g. "guidance.w"."""


class AuthenticationError(IroError):
    status_code = 401
    error_type = "authentication_error"


class PermissionDeniedError(IroError):
    status_code = 403
    error_type = "permission_error"


class NotFoundError(IroError):
    status_code = 404
    error_type = "invalid_request_error"


class ConflictError(IroError):
    status_code = 409
    error_type = "invalid_request_error"


class PayloadTooLargeError(IroError):
    status_code = 413
    error_type = "invalid_request_error"


class OverloadedError(IroError):
    status_code = 429
    error_type = "rate_limit_error"


class QuotaExceededError(IroError):
    """An API key's quota of files, file bytes or unfinished batches is used up.

    429, as OpenAI answers a used-up quota (`insufficient_quota`): the request is well-formed and the
    same one succeeds once the key deletes files or its batches end, so 400 (fix the request) would
    mislead, and clients already treat 429 as "over a limit". Unlike a full queue it does not clear
    in a second: the response has no Retry-After and says `x-should-retry: false` (the openai SDK
    then raises at once instead of retrying). The message names the quota's setting and its limit."""

    status_code = 429
    error_type = "insufficient_quota"


class UnavailableError(IroError):
    status_code = 503
    error_type = "service_unavailable"


class EngineDeadError(UnavailableError):
    """The engine died; the server cannot recover by itself."""


_DESCRIPTIONS = {
    400: "Invalid request (malformed JSON, a bad field, an unusable guidance setting).",
    401: "Missing or wrong bearer token.",
    403: "The token is valid but this route needs the admin key.",
    404: "Unknown route, model, value or version.",
    409: "Conflicting request.",
    413: "Request body larger than the server's limit.",
    429: "Too many requests in progress (retry after `Retry-After` seconds), or a per-key quota of files or "
         "batches used up (`x-should-retry: false`: delete files or wait for batches to end).",
    503: "Engine starting or dead, or a value being swapped; retry after `Retry-After` seconds unless the engine died.",
}


def without_paths(message: str, **paths) -> str:
    """`message` with each path in `paths` (and its resolved form) replaced by its name: a client
    is told which version was refused and why, never where the server keeps its files.

        >>> without_paths("/srv/reg/pol/v0002: bad hash", **{"pol@2": "/srv/reg/pol/v0002"})
        'pol@2: bad hash'
    """
    from pathlib import Path

    for name, path in sorted(paths.items(), key=lambda kv: -len(str(kv[1] or ""))):
        if path:
            for form in {str(Path(path).resolve()), str(path)}:
                message = message.replace(form, name)
    return message


def error_responses(*statuses: int) -> dict[int, dict[str, Any]]:
    """OpenAPI `responses=` for a route: each status documented with the `ErrorResponse` body."""
    retry = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}}
    return {s: {"model": ErrorResponse, "description": _DESCRIPTIONS[s], **({"headers": retry} if s in (429, 503) else {})}
            for s in statuses}


def error_body(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code)).model_dump()


# ----------------------------------------------------------------------------- request validation
def _is_union_tag(part) -> bool:
    # pydantic names the member of a union that failed in the location: ("stop", "list[constrained-str]")
    return isinstance(part, str) and (part in _TYPE_NAMES or "[" in part or part.startswith(("constrained-", "function-")))


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none", "constrained-str"}


def _param_from_loc(loc) -> str | None:
    parts = [str(p) for p in loc if p != "body" and not _is_union_tag(p)]
    return ".".join(parts) or None


def _message(error: dict) -> str:
    if error.get("type") == "string_unicode":  # a constrained string holding a lone surrogate
        return UNICODE_ERROR
    message = str(error.get("msg", "invalid value"))
    return message.removeprefix("Value error, ")


def _relevant(errors: list[dict]) -> list[dict]:
    """One error per field, the most telling first: in a union (`stop`: a string or a list of them)
    every member reports; "at most 16 items" says more than "not a string"."""
    mismatch = [e for e in errors if not str(e.get("type", "")).endswith(("_type", "_parsing"))]
    seen, out = set(), []
    for e in mismatch + errors:
        param = _param_from_loc(e.get("loc", ()))
        if param not in seen:
            seen.add(param)
            out.append(e)
    return out


def validation_error_info(errors: list[dict]) -> dict:
    """The OpenAI-shaped error (message, type, param, code) for a body that did not validate (pydantic's
    `errors()`): an unknown field in OpenAI's wording, else every field's problem (at most 5). The HTTP
    endpoints and the batch runner (a batch line is a body too) answer with it."""
    errors = _relevant(errors)
    first = errors[0]
    param = _param_from_loc(first.get("loc", ()))
    if first.get("type") == "extra_forbidden":  # OpenAI's wording for an unknown field
        return {"message": f"Unrecognized request argument supplied: {param}", "type": "invalid_request_error",
                "param": param, "code": "unknown_field"}
    message = "; ".join(f"{_param_from_loc(e.get('loc', ())) or 'body'}: {_message(e)}" for e in errors[:5])
    return {"message": message, "type": "invalid_request_error", "param": param, "code": "invalid_value"}
