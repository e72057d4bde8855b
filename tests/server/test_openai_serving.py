"""Serving logic of the OpenAI endpoints with a scripted engine: choices, usage, streaming."""

from __future__ import annotations

import asyncio
import json

import pytest

from server.errors import InvalidRequestError
from server.openai.generate import merge
from server.openai.serving import OpenAIServing, RenderedPrompt
from tests.server.conftest import ScriptedEngine, make_client



def sse_events(response) -> list:
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_completion_choices_and_usage(client, engine):
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": ["hello", "hi"], "n": 2,
                                                "max_tokens": 3}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] == "abc" and c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"] == {"prompt_tokens": 5 + 2, "completion_tokens": 4 * 3, "total_tokens": 7 + 12,
                             "completion_tokens_details": None}
    assert [ids for ids, _ in engine.requests] == [list(b"hello"), list(b"hi")]


def test_completion_echo_and_token_prompt(client):
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": list(b"xy"), "echo": True,
                                                "max_tokens": 2}).json()
    assert body["choices"][0]["text"] == "xyab"
    assert body["usage"]["prompt_tokens"] == 2


def test_chat_renders_template_and_defaults_max_tokens(client, engine):
    body = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "developer", "content": "be brief"},
                                      {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}).json()
    prompt = "<system>be brief\n<user>hi\n<assistant>"
    assert engine.requests[0][0] == list(prompt.encode())
    assert engine.requests[0][1].max_tokens == 64 - len(prompt)  # the rest of the context
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "abcdefghijklmnopqrstuvwxyz"}
    assert body["usage"]["completion_tokens"] == 26


def test_max_completion_tokens_wins(client, engine):
    client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                              "max_tokens": 9, "max_completion_tokens": 4})
    assert engine.requests[0][1].max_tokens == 4


def test_chat_stream_with_usage(client):
    response = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True}})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    *chunks, last = events
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 2 * 3
    assert {c["choices"][0]["index"] for c in chunks if c["choices"][0]["delta"].get("role")} == {0, 1}
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(c["delta"]["content"] or "" for c in mine) == "abc"
        assert mine[-1]["finish_reason"] == "length"
    assert len({e["id"] for e in events}) == 1


def test_completion_stream_without_usage(client):
    events = sse_events(client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 4,
                                                             "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in events) == "abcd"
    assert all(e["usage"] is None for e in events)


def test_stream_error_mid_way_becomes_an_event_and_releases_the_slot():
    engine = ScriptedEngine(error=RuntimeError("boom"), fail_after=2)
    client = make_client(engine)
    events = sse_events(client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 5,
                                                             "stream": True}))
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["a", "b"]
    assert events[-1]["error"]["code"] == "engine_error"
    assert client.app.state.serving._admitted == 0
    assert engine.closed == 1


def test_admission_slot_released_after_errors(client):
    for _ in range(3):
        client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1})
    assert client.app.state.serving._admitted == 0


def test_check_lengths():
    serving = OpenAIServing(ScriptedEngine())
    assert serving.check_lengths([RenderedPrompt([1] * 10, None)], None) == 54
    assert serving.check_lengths([RenderedPrompt([1] * 10, None)], 54) == 54
    with pytest.raises(InvalidRequestError) as exc:
        serving.check_lengths([RenderedPrompt([1] * 10, None)], 55)
    assert exc.value.param == "max_tokens" and exc.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequestError) as exc:
        serving.check_lengths([RenderedPrompt([1] * 64, None)], 1, prompt_param="prompt")
    assert exc.value.param == "prompt"


async def test_merge_interleaves_and_closes_all():
    closed = []

    async def gen(name, n):
        try:
            for i in range(n):
                yield name, i
                await asyncio.sleep(0)
        finally:
            closed.append(name)

    items = [x async for x in merge([gen("a", 3), gen("b", 2)])]
    assert sorted(items) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]

    closed.clear()
    merged = merge([gen("a", 100), gen("b", 100)])
    await anext(merged)
    await merged.aclose()  # a client going away closes every engine stream
    assert sorted(closed) == ["a", "b"]


async def test_merge_forwards_errors():
    async def bad():
        yield 1
        raise ValueError("broken stream")

    async def good():
        for i in range(5):
            yield i
            await asyncio.sleep(0)

    with pytest.raises(ValueError, match="broken stream"):
        async for _ in merge([bad(), good()]):
            pass


def test_a_policy_model_sends_its_adapter_with_the_request(client, engine):
    """The adapter is resolved with the model id and travels in the request (no ambient state)."""
    from types import SimpleNamespace

    served = SimpleNamespace(lora="pol-adapter")
    client.app.state.serving.policies = SimpleNamespace(
        resolve=lambda model, values=None: served if model == "pol" else None, names=lambda: ["pol"])
    for model in ("pol", "tiny", "pol"):
        r = client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
    assert [request.adapter for _, request in engine.requests] == ["pol-adapter", None, "pol-adapter"]
