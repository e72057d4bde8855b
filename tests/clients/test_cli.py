"""`iro chat` / `iro complete` (clients/cli.py) over httpx.MockTransport."""

from __future__ import annotations

import functools
import json

import httpx
import pytest
import typer
from typer.testing import CliRunner

import clients.cli
from clients import IroClient
from tests.clients.conftest import (
    GUIDANCE_INFO, Recorder, chat_body, chat_chunk, completion_body, error_body, models_body, routes, sse,
)


@pytest.fixture
def run(monkeypatch):
    """run(handler, *args) -> (click Result, Recorder): the commands on a fresh Typer app."""
    app = typer.Typer()
    clients.cli.register(app)
    for name in ("IRO_BASE_URL", "IRO_API_KEY", "IRO_ADMIN_KEY"):
        monkeypatch.delenv(name, raising=False)

    def invoke(handler, *args: str):
        rec = Recorder(handler)
        factory = functools.partial(IroClient, transport=httpx.MockTransport(rec), retry_backoff=0.001)
        monkeypatch.setattr(clients.cli, "IroClient", factory)
        return CliRunner().invoke(app, list(args)), rec

    return invoke


def test_chat_prints_answer_then_usage_and_guidance(run):
    handler = routes({"GET /v1/models": models_body(), "POST /v1/chat/completions": chat_body("Tea is calm.",
                                                                                          guidance=GUIDANCE_INFO)})
    result, rec = run(handler, "chat", "Write about tea", "--value", "helpful", "--mode", "cbs", "--max-tokens", "9",
                      "--temperature", "0.3", "--system", "Be brief.", "--api-key", "k", "--url", "http://x:1")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "Tea is calm."
    assert "3 prompt + 2 completion tokens" in lines[1] and "guided by helpful v1,2 (cbs w=2 k=2 l=4" in lines[1]
    body = rec.json()
    assert body["guidance"] == {"value": "helpful", "mode": "cbs"} and body["max_tokens"] == 9
    assert body["temperature"] == 0.3 and [m["role"] for m in body["messages"]] == ["system", "user"]
    last = rec.requests[-1]
    assert str(last.url).startswith("http://x:1/") and last.headers["authorization"] == "Bearer k"


def test_complete_json_prints_the_raw_response(run):
    handler = routes({"POST /v1/completions": completion_body(" there")})
    result, rec = run(handler, "complete", "Hello", "--model", "m", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["choices"][0]["text"] == " there"
    assert "guidance" not in rec.json() and rec.json()["model"] == "m"


def test_chat_stream_prints_text_as_it_comes(run):
    usage = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    body = sse(chat_chunk("Hel"), chat_chunk("lo", finish="stop"), chat_chunk(None, usage=usage))
    result, rec = run(lambda request: httpx.Response(200, content=body), "chat", "Hi", "--model", "m", "--stream")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "Hello"
    assert "stop · 4 prompt + 2 completion tokens" in result.output
    assert rec.json()["stream"] is True and rec.json()["stream_options"] == {"include_usage": True}


def test_stream_json_prints_one_chunk_per_line(run):
    body = sse(chat_chunk("a"), chat_chunk("b"))
    result, _ = run(lambda request: httpx.Response(200, content=body), "chat", "Hi", "--model", "m", "--stream",
                    "--json")
    assert [json.loads(line)["choices"][0]["delta"]["content"] for line in result.output.splitlines()] == ["a", "b"]


def test_errors_are_reported_without_a_traceback(run):
    handler = routes({"POST /v1/chat/completions": httpx.Response(
        404, json=error_body("The model `nope` does not exist.", param="model", code="model_not_found"))})
    result, _ = run(handler, "chat", "Hi", "--model", "nope")
    assert result.exit_code == 1
    assert "error: 404 The model `nope` does not exist. (param=model, code=model_not_found)" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
