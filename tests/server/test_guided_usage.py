"""`usage` of a guided answer: `completion_tokens` counts every token the search generated (the cost,
as OpenAI counts a reasoning model's hidden tokens), `completion_tokens_details.reasoning_tokens`
says how many of them were not returned, and `max_tokens` bounds each returned choice. Plain answers
are unchanged. Scripted engine and value, no vLLM."""

from __future__ import annotations

import json

import pytest

from tests.server.test_search_guided import client, complete


def returned(body) -> int:
    return sum(len(choice["token_ids"]) for choice in body["choices"])


@pytest.mark.parametrize("mode", ["cbs", "bon", "pf", "dvts"])
def test_usage_counts_the_search_and_says_how_much_was_not_returned(mode):
    c, _ = client()
    body = complete(c, guidance={"mode": mode}, n=2, max_tokens=8, return_token_ids=True).json()
    usage = body["usage"]
    assert all(len(choice["token_ids"]) <= 8 for choice in body["choices"])  # max_tokens bounds each choice
    assert usage["completion_tokens"] == body["guidance"]["tokens"] > returned(body)
    assert usage["completion_tokens_details"] == {"reasoning_tokens": usage["completion_tokens"] - returned(body)}
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_plain_usage_has_no_details():
    c, _ = client()
    body = complete(c, model="tiny", max_tokens=3).json()
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5,
                             "completion_tokens_details": None}


def test_a_guided_stream_reports_the_same_split():
    c, _ = client()
    r = c.post("/v1/chat/completions", json={
        "model": "tiny+v", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "n": 2, "seed": 3,
        "stream": True, "stream_options": {"include_usage": True}})
    events = [json.loads(x[6:]) for x in r.text.split("\n\n") if x and x != "data: [DONE]"]
    texts = {0: "", 1: ""}
    for e in events:
        for choice in e["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
    usage = events[-1]["usage"]
    shown = sum(len(t) for t in texts.values())  # one token per letter with this engine
    assert shown <= 2 * 6
    assert usage["completion_tokens"] - usage["completion_tokens_details"]["reasoning_tokens"] == shown
