"""Who may call what, as the README promises: the admin key falls back to the API key, and a
server started without keys is open (admin routes included). Checked on the real app (`build_app`)
with no engine: a route that passed the key check answers 503 `engine_starting`."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import build_app
from server.settings import ServerSettings

PASSED, MISSING, WRONG = 503, 401, 403


def status(settings: dict, path: str, token: str | None) -> int:
    client = TestClient(build_app(ServerSettings(**settings)))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.get(path, headers=headers).status_code


@pytest.mark.parametrize("settings, token, expected", [
    ({"api_key": "k"}, "k", PASSED),  # no admin key: the API key opens the admin routes
    ({"api_key": "k"}, None, MISSING),
    ({"api_key": "k"}, "other", WRONG),
    ({"api_key": "k", "admin_key": "a"}, "a", PASSED),
    ({"api_key": "k", "admin_key": "a"}, "k", WRONG),  # with an admin key, the API key is not enough
    ({"admin_key": "a"}, None, MISSING),
    ({}, None, PASSED),  # no keys at all: open
])
def test_admin_routes(settings, token, expected):
    assert status(settings, "/v1/values", token) == expected


@pytest.mark.parametrize("settings, token, expected", [
    ({"api_key": "k", "admin_key": "a"}, "a", MISSING),  # the admin key is not an API key
    ({"api_key": "k"}, "k", PASSED),
    ({"admin_key": "a"}, None, PASSED),  # an admin key alone leaves the API open
    ({}, None, PASSED),
])
def test_api_routes(settings, token, expected):
    assert status(settings, "/v1/models", token) == expected
