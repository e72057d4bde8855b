"""Bearer-token checks (constant-time) for the API key and the separate admin key."""

from __future__ import annotations

import secrets

from fastapi import Request

from server.errors import AuthenticationError, PermissionDeniedError


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(given: str | None, expected: str) -> bool:
    return given is not None and secrets.compare_digest(given.encode(), expected.encode())


async def require_api_key(request: Request) -> None:
    settings = request.app.state.settings
    if settings.api_key is None:
        return
    if not _matches(_bearer(request), settings.api_key.get_secret_value()):
        raise AuthenticationError("Incorrect or missing API key (Authorization: Bearer <key>).", code="invalid_api_key")


async def require_admin_key(request: Request) -> None:
    settings = request.app.state.settings
    key = settings.admin_key or settings.api_key
    if key is None:
        return
    token = _bearer(request)
    if token is None:
        raise AuthenticationError("Missing admin key (Authorization: Bearer <admin key>).", code="invalid_api_key")
    if not _matches(token, key.get_secret_value()):
        raise PermissionDeniedError("This endpoint needs the admin key.", code="admin_key_required")
