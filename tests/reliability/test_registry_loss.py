"""The value registry folder disappears (deleted, or replaced by a file) while serving. (Tests run
as root, which reads through `chmod 000`; an unreadable folder is the same case to the server.)

The server keeps serving the values it has loaded, says what is wrong in GET /v1/values
`registry_error`, and once the folder is back it picks up new publishes again.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from tests.e2e.test_guided import iro_values_init, wait_serving
from tests.reliability.conftest import wait_until

pytestmark = pytest.mark.e2e
NAME = "keep"


def registry_error(server) -> str | None:
    with server.admin() as admin:
        return admin.get("/v1/values").json()["registry_error"]


def guided_ok(server) -> dict:
    with server.http() as http:
        r = http.post("/v1/chat/completions", json={
            "model": f"{server.model_id}+{NAME}", "max_tokens": 4, "guidance": {"w": 2, "k": 2, "l": 2},
            "messages": [{"role": "user", "content": "Say hello"}]})
    assert r.status_code == 200, r.text
    return r.json()["guidance"]


@contextmanager
def registry_gone(server, how: str):
    root = server.values_dir
    away = root.with_name(root.name + "-away")
    root.rename(away)
    if how == "file":
        root.write_text("not a folder\n")
    try:
        yield
    finally:
        if root.is_file():
            root.unlink()
        away.rename(root)


@pytest.mark.parametrize("how", ["deleted", "file"])
def test_serving_survives_losing_the_registry(server, how):
    before = iro_values_init(server, NAME)
    wait_serving(server, NAME, before)
    with registry_gone(server, how):
        error = wait_until(lambda: registry_error(server), lambda e: e is not None, timeout=15)
        assert error and str(server.values_dir) in error
        assert guided_ok(server)["versions"] == [before]  # loaded values keep serving
        with server.admin() as admin:
            listed = {v["name"]: v for v in admin.get("/v1/values").json()["data"]}
        assert listed[NAME]["serving_version"] == before
    assert wait_until(lambda: registry_error(server), lambda e: e is None, timeout=15) is None
    after = iro_values_init(server, NAME)  # the trainer publishes again: picked up
    assert after == before + 1
    wait_serving(server, NAME, after)
    assert guided_ok(server)["versions"] == [after]
    assert "registry" in server.log_path.read_text(errors="replace")
