"""A scripted engine and an app around it: serving logic and error mapping without vLLM."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from server.app import build_app
from server.engine import EngineClient
from server.openai.serving import OpenAIServing
from server.settings import ServerSettings

API_KEY = "unit-key"


class ByteTokenizer:
    """One token per UTF-8 byte; a chat template of `<role>content` lines."""

    eos_token_id = 0

    def __len__(self) -> int:
        return 256

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(ids).decode(errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False) -> str:
        if any(m["role"] == "tool" for m in messages):
            raise ValueError("this template has no tool role")
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"


class ScriptedEngine(EngineClient):
    """Answers every request with `script` (cut to max_tokens), one token per character.

    `fail_after` tokens into a request it raises `error` (to test error paths).
    """

    model_id = "tiny"
    max_model_len = 64
    eos_token_ids = [0]

    def __init__(self, script: str = "abcdefghijklmnopqrstuvwxyz", error: Exception | None = None, fail_after: int = 0):
        self._tokenizer = ByteTokenizer()
        self.script = script
        self.error = error
        self.fail_after = fail_after
        self.dead = False
        self.requests: list[tuple[list[int], object]] = []
        self.closed = 0

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def errored(self) -> bool:
        return self.dead

    async def stream(self, request, request_id, *, delta=False):
        params = request
        self.requests.append((list(request.prompt_ids), request))
        text = self.script[:params.max_tokens]
        try:
            if delta:
                for pos, ch in enumerate(text):
                    if self.error is not None and pos == self.fail_after:
                        raise self.error
                    last = pos == len(text) - 1
                    yield self._output([ch], params, "length" if last else None)
            else:
                if self.error is not None:
                    raise self.error
                yield self._output(list(text), params, "length")
        finally:
            self.closed += 1

    def _output(self, chars, params, finish_reason):
        outputs = [SimpleNamespace(index=i, text="".join(chars), token_ids=[ord(c) for c in chars],
                                   finish_reason=finish_reason, logprobs=None) for i in range(params.n)]
        return SimpleNamespace(outputs=outputs)

    async def sample(self, request):  # pragma: no cover - not used by the OpenAI endpoints
        raise NotImplementedError


def make_client(engine: EngineClient | None = None, *, serving: bool = True, raise_server_exceptions: bool = True,
                **settings) -> TestClient:
    """A TestClient on `build_app` with `engine` behind the serving object (no lifespan, no vLLM)."""
    app = build_app(ServerSettings(api_key=API_KEY, max_n=4, max_queue=8, **settings))
    if serving:
        engine = engine or ScriptedEngine()
        app.state.serving = OpenAIServing(engine, max_n=app.state.settings.max_n,
                                          max_queue=app.state.settings.max_queue, metrics=app.state.metrics)
    return TestClient(app, headers={"Authorization": f"Bearer {API_KEY}"},
                      raise_server_exceptions=raise_server_exceptions)


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture
def client(engine) -> TestClient:
    return make_client(engine)


# --- PostgreSQL: one throwaway server per test session, a fresh database per test ---------------

def _postgres_bin() -> "Path | None":
    import glob
    import shutil
    from pathlib import Path

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server of its own (initdb into a tmp folder, `pg_ctl start`, a unix socket in that
    folder, no TCP); yields (socket folder, port) and is stopped at the end of the session. As root
    it runs as the `postgres` user (initdb refuses root). Skipped, saying why, when PostgreSQL is
    not installed (`.ci/run` installs it)."""
    import os
    import pwd
    import shutil
    import socket
    import subprocess
    import tempfile

    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin or on PATH): "
                    "the postgresql variants of the database tests did not run; `apt-get install postgresql`")
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            pg_user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as (initdb refuses root)")
        as_user = ["runuser", "-u", "postgres", "--"]
    folder = tempfile.mkdtemp(prefix="iro-pg-")  # short: a unix socket path is limited to ~100 chars
    if as_user:
        os.chown(folder, pg_user.pw_uid, pg_user.pw_gid)
    with socket.socket() as s:  # with no TCP listener the port only names the socket file; still unique
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = f"{folder}/data"

    def run(*cmd: str) -> None:
        done = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    try:
        run(str(bindir / "initdb"), "-D", data, "-A", "trust", "-U", "iro", "-E", "UTF8", "--no-sync",
            "--no-instructions")
        # fsync off: a throwaway server; durability against a killed client does not depend on it
        run(str(bindir / "pg_ctl"), "-D", data, "-l", f"{folder}/server.log", "-w", "-t", "60", "-o",
            f"-p {port} -k {folder} -c listen_addresses='' -c fsync=off -c full_page_writes=off "
            f"-c max_connections=100", "start")
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        yield folder, port
    finally:
        try:
            run(str(bindir / "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server, request):
    """A fresh, empty database on the session's PostgreSQL (dropped after the test); its SQLAlchemy URL."""
    import re

    import psycopg

    folder, port = postgres_server
    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40] + f"_{id(request) % 100000}"
    with psycopg.connect(host=folder, port=port, user="iro", dbname="postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://iro@/{name}?host={folder}&port={port}"
    with psycopg.connect(host=folder, port=port, user="iro", dbname="postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])  # PostgreSQL: make test
def database_url(request, tmp_path):
    """The server's database URL, once on SQLite (the default: a file in tmp) and once on PostgreSQL."""
    if request.param == "sqlite":
        from server.store.db import default_url

        return default_url(tmp_path)
    return request.getfixturevalue("postgres_url")


class OneValue:
    """The server's values (`has`, `names`, `chain_for`) holding one value, "v", whose chain has
    the search `defaults` given (`mode`, `w`, `k`, `l`) and the engine heads given (none: a value
    the scorer runs)."""

    def __init__(self, value_heads=None, value_layers=None, **defaults) -> None:
        defaults = {"mode": "cbs", "w": 2, "k": 2, "l": 2, **defaults}
        link = SimpleNamespace(version=1, manifest=SimpleNamespace(defaults=SimpleNamespace(**defaults)))
        self.chain = SimpleNamespace(name="v", links=((link, 1.0),), value_heads=value_heads, value_layers=value_layers,
                                     versions=[1], betas=[1.0], defaults=link.manifest.defaults)

    def has(self, name):
        return name == "v"

    def names(self):
        return ["v"]

    async def chain_for(self, spec):
        return self.chain
