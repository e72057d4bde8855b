"""Bearer-token checks (constant-time) for the API keys and the separate admin key.

Each API key has a name (`api_key` is `default`, the others are `api_keys`' names); the name a
request's key has is its owner's in the database: files, batches and stored completions are seen
and touched only by the key that made them, and quotas count per name. With no key set, every
caller is `default`."""

from __future__ import annotations

import secrets

from fastapi import Request

from server.errors import AuthenticationError, PermissionDeniedError
from server.settings import DEFAULT_KEY_NAME


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(given: str | None, expected: str) -> bool:
    return given is not None and secrets.compare_digest(given.encode(), expected.encode())


async def require_api_key(request: Request) -> None:
    """Refuse a request without one of the API keys; record the key's name (`api_key_name`)."""
    keys = request.app.state.settings.named_api_keys()
    if not keys:
        request.state.api_key_name = DEFAULT_KEY_NAME
        return
    token = _bearer(request)
    matched = [name for name, key in keys if _matches(token, key)]  # every key compared: no early exit
    if not matched:
        raise AuthenticationError("Incorrect or missing API key (Authorization: Bearer <key>).", code="invalid_api_key")
    request.state.api_key_name = matched[0]


def api_key_name(request: Request) -> str:
    """The name of the API key that `require_api_key` accepted for this request."""
    return getattr(request.state, "api_key_name", DEFAULT_KEY_NAME)


async def require_admin_key(request: Request) -> None:
    settings = request.app.state.settings
    key = settings.admin_key or settings.api_key
    if key is None:
        if settings.api_keys:
            raise PermissionDeniedError("The admin routes need the admin key, and this server has none (only named "
                                        "API keys): set IRO_ADMIN_KEY.", code="admin_key_required")
        return
    token = _bearer(request)
    if token is None:
        raise AuthenticationError("Missing admin key (Authorization: Bearer <admin key>).", code="invalid_api_key")
    if not _matches(token, key.get_secret_value()):
        raise PermissionDeniedError("This endpoint needs the admin key.", code="admin_key_required")
