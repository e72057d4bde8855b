"""Safe defaults of the process (issue 25): `iro serve` refuses keyless admin routes on a
non-loopback address unless told so (then logs it loudly), and uvicorn gets the connection
limits from the settings. No engine: uvicorn.run and build_app are replaced where they would start."""

from __future__ import annotations

import logging

import pytest
from typer.testing import CliRunner

import iro.cli
from server.settings import ServerSettings, is_loopback

CLEAN_ENV = {"IRO_API_KEY": None, "IRO_ADMIN_KEY": None, "IRO_ALLOW_OPEN_ADMIN": None, "IRO_HOST": None}


@pytest.fixture
def serve(monkeypatch):
    """Run `iro serve ARGS` up to uvicorn.run; return (result, uvicorn.run's keywords or None)."""
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.setdefault("run", kw))

    def run(*args, env=None):
        result = CliRunner().invoke(iro.cli.app, ["serve", *map(str, args)], env={**CLEAN_ENV, **(env or {})})
        return result, seen.get("run")

    return run


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.7", "example.test"])
def test_keyless_admin_routes_on_a_network_address_are_refused(serve, host):
    result, run = serve("--host", host)
    assert result.exit_code == 2 and run is None
    assert "--allow-open-admin" in result.output and "admin" in result.output


@pytest.mark.parametrize("args,env", [
    (["--host", "0.0.0.0", "--admin-key", "k"], {}),
    (["--host", "0.0.0.0"], {"IRO_API_KEY": "k"}),  # the admin routes fall back to the API key
    (["--host", "127.0.0.1"], {}),
    (["--host", "::1"], {}),
])
def test_keys_or_loopback_start(serve, args, env):
    result, run = serve(*args, env=env)
    assert result.exit_code == 0, result.output
    assert run["host"] == args[1]


def test_allow_open_admin_starts_and_says_so_loudly(serve, caplog):
    with caplog.at_level(logging.WARNING, logger="server.app"):
        result, run = serve("--host", "0.0.0.0", "--allow-open-admin")
    assert result.exit_code == 0, result.output
    assert run["host"] == "0.0.0.0"
    assert any("need NO key" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_connection_limits_reach_uvicorn(serve):
    result, run = serve("--limit-concurrency", 7, "--timeout-keep-alive", 3, "--body-timeout", 2.5)
    assert result.exit_code == 0, result.output
    assert run["limit_concurrency"] == 7 and run["timeout_keep_alive"] == 3
    assert ServerSettings(body_timeout=2.5).body_timeout == 2.5


def test_loopback_addresses():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "my-host"))
