"""`POST /v1/score` through the app with a scripted engine and scorer (no vLLM, no model)."""

from __future__ import annotations

from server.openai.serving_score import ScoreServing
from tests.server.conftest import OneValue, ScriptedEngine, make_client
from tests.server.test_sampling import _Scorer


def test_score_renders_the_chat_prompt_and_ranks_by_the_chain():
    engine = ScriptedEngine()
    client = make_client(engine)
    client.app.state.score_serving = ScoreServing(engine, _Scorer(), OneValue())
    body = client.post("/v1/score", json={"value": "v", "messages": [{"role": "user", "content": "hi"}],
                                          "responses": ["a", "abc"]}).json()
    prompt = len("<user>hi\n<assistant>")
    assert body["values"] == [[prompt + 1.0], [prompt + 3.0]]  # the scorer saw prompt + response ids
    assert body["scores"][1] > body["scores"][0] and body["versions"] == [1]
    error = client.post("/v1/score", json={"value": "v", "prompt": "x" * 60, "responses": ["y" * 10]}).json()
    assert error["error"]["param"] == "responses"


def test_score_without_values_is_a_503():
    response = make_client().post("/v1/score", json={"value": "v", "prompt": "hi", "responses": ["a"]})
    assert response.status_code == 503 and response.json()["error"]["code"] == "values_disabled"


def test_guided_stream_through_the_app():
    import json

    from server.guided import GuidedGenerator
    from server.openai.serving import OpenAIServing
    from tests.server.test_sampling import _ChunkEngine

    engine = _ChunkEngine()
    client = make_client(engine)
    client.app.state.serving = OpenAIServing(engine, max_n=4, values=OneValue(),
                                             guided=GuidedGenerator(engine, _Scorer(), OneValue()))
    response = client.post("/v1/chat/completions", json={
        "model": "tiny+v", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "n": 2, "stream": True,
        "stream_options": {"include_usage": True}})
    lines = [line for line in response.text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    texts = {0: "", 1: ""}
    for e in events:
        for c in e["choices"]:
            texts[c["index"]] += c["delta"].get("content") or ""
    assert texts == {0: "AAAAAA", 1: "AAAAAA"}
    finishes = [c for e in events for c in e["choices"] if c["finish_reason"]]
    assert [c["finish_reason"] for c in finishes] == ["length", "length"]
    assert [e["guidance"]["mode"] for e in events if e.get("guidance")] == ["cbs"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 6
    body = client.post("/v1/completions", json={"model": "tiny+v", "prompt": "hi", "max_tokens": 4, "n": 2,
                                                "return_token_ids": True}).json()
    assert [c["text"] for c in body["choices"]] == ["AAAA", "AAAA"] and body["guidance"]["w"] == 2
    assert body["choices"][0]["token_ids"] == [65] * 4 and body["prompt_token_ids"] == [list(b"hi")]


def test_score_cost_is_bounded_before_the_scorer_runs():

    class Counting(_Scorer):
        calls = 0

        async def values(self, chain, items):
            Counting.calls += 1
            return await super().values(chain, items)

    engine = ScriptedEngine()
    client = make_client(engine)
    serving = client.app.state.score_serving = ScoreServing(engine, Counting(), OneValue(), max_responses=2,
                                                            max_tokens=12, max_queue=1)
    error = client.post("/v1/score", json={"value": "v", "prompt": "hi", "responses": ["a", "b", "c"]}).json()["error"]
    assert error["param"] == "responses" and "at most 2" in error["message"]
    error = client.post("/v1/score", json={"value": "v", "prompt": "hi", "responses": ["a" * 6, "b" * 6]}).json()["error"]
    assert error["code"] == "too_many_tokens" and "16 tokens" in error["message"] and "12" in error["message"]
    assert Counting.calls == 0
    serving._in_progress = 1  # one request is scoring: the next waits for no one, it is told to retry
    busy = client.post("/v1/score", json={"value": "v", "prompt": "hi", "responses": ["a"]})
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "scorer_busy"
    serving._in_progress = 0
    assert client.post("/v1/score", json={"value": "v", "prompt": "hi", "responses": ["a"]}).status_code == 200
    assert Counting.calls == 1 and serving._in_progress == 0
