"""One error shape everywhere, and the exception -> status mapping of `build_app`."""

from __future__ import annotations

import pytest

from tests.server.conftest import API_KEY, ScriptedEngine, make_client


CHAT = [{"role": "user", "content": "hi"}]


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("kwargs,status,code,param", [
    (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "invalid_json", None),
    (dict(json={"model": "tiny", "messages": "hi"}), 400, "invalid_value", "messages"),
    (dict(json={"model": "tiny", "messages": []}), 400, "invalid_value", "messages"),
    (dict(json={"messages": CHAT}), 400, "invalid_value", "model"),
    (dict(json={"model": "gpt-9", "messages": CHAT}), 404, "model_not_found", "model"),
    (dict(json={"model": "tiny", "messages": CHAT, "temperature": -1}), 400, "invalid_value", "temperature"),
    (dict(json={"model": "tiny", "messages": CHAT, "n": 5}), 400, "n_too_large", "n"),
    (dict(json={"model": "tiny", "messages": CHAT, "max_tokens": 60}), 400, "context_length_exceeded", "max_tokens"),
    (dict(json={"model": "tiny", "messages": [{"role": "user", "content": "x" * 80}]}), 400,
     "context_length_exceeded", "messages"),
    (dict(json={"model": "tiny", "messages": CHAT, "logit_bias": {"300": 1}}), 400, "invalid_value", "logit_bias"),
    (dict(json={"model": "tiny", "messages": CHAT, "logit_bias": {"a": 1}}), 400, "invalid_value", None),
    (dict(json={"model": "tiny", "messages": [{"role": "tool", "content": "x", "tool_call_id": "c1"}]}), 400, None,
     "messages"),
    (dict(json={"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}), 400, None, "messages.0"),
    (dict(json={"model": "tiny", "messages": [{"role": "user"}]}), 400, None, "messages.0"),
    (dict(json={"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), 400, None,
     "messages.0"),
    (dict(json={"model": "tiny", "messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}),
     400, None, "tools"),
    (dict(json={"model": "tiny", "messages": CHAT, "tool_choice": "auto"}), 400, None, "tool_choice"),
    (dict(json={"model": "tiny", "messages": CHAT, "frobnicate": 1}), 400, "unknown_field", "frobnicate"),
    (dict(json={"model": "tiny", "messages": CHAT, "response_format": {"type": "xml"}}), 400, None,
     "response_format.type"),
    (dict(json={"model": "tiny", "messages": CHAT, "guidance": {"w": 2}}), 400, None, "guidance"),
], ids=["bad-json", "wrong-type", "empty-messages", "missing-model", "unknown-model", "negative-temperature",
        "n-over-cap", "max-tokens-beyond-context", "prompt-beyond-context", "logit-bias-vocab", "logit-bias-key",
        "template-error", "tool-without-call-id", "user-without-content", "image-part", "tools", "tool-choice",
        "unknown-field", "bad-response-format", "guidance-disabled"])
def test_chat_errors(client, engine, kwargs, status, code, param):
    error = error_of(client.post("/v1/chat/completions", **kwargs), status)
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    assert engine.requests == []  # refused before reaching the engine


@pytest.mark.parametrize("prompt", ["", [], [[]], [1, 256], [-1], [[1], [2, 999]]])
def test_bad_completion_prompts(client, prompt):
    assert error_of(client.post("/v1/completions", json={"model": "tiny", "prompt": prompt}), 400)["param"] == "prompt"


def test_prompt_beyond_context_names_prompt(client):
    error = error_of(client.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 64}), 400)
    assert error["param"] == "prompt" and error["code"] == "context_length_exceeded"


def test_auth(engine):
    client = make_client(engine)
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer nope"}, {"Authorization": f"Token {API_KEY}"}):
        error = error_of(client.get("/v1/models", headers=headers), 401)
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert client.get("/health", headers={"Authorization": ""}).status_code == 200


def test_unknown_routes_and_methods(client):
    assert error_of(client.get("/v1/nothing"), 404)["code"] == "not_found"
    assert error_of(client.get("/nothing"), 404)["code"] == "not_found"
    assert error_of(client.delete("/v1/models"), 405)["code"] == "method_not_allowed"


def test_body_limit(engine):
    client = make_client(engine, max_body_bytes=4096)
    big = {"model": "tiny", "prompt": "x" * 5000}
    assert "4096" in error_of(client.post("/v1/completions", json=big), 413)["message"]
    chunks = iter([b'{"model": "tiny", "prompt": "', b"x" * 3000, b"x" * 3000, b'"}'])  # no content-length
    error_of(client.post("/v1/completions", content=chunks, headers={"content-type": "application/json"}), 413)
    assert engine.requests == []


def test_engine_starting_and_dead():
    starting = make_client(serving=False)
    assert error_of(starting.get("/v1/models"), 503)["code"] == "engine_starting"
    assert error_of(starting.get("/health"), 503)["code"] == "engine_starting"

    engine = ScriptedEngine()
    client = make_client(engine)
    engine.dead = True
    error = error_of(client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT}), 503)
    assert error["code"] == "engine_dead" and error["type"] == "service_unavailable"


def test_queue_full_is_429_with_retry_after(client):
    serving = client.app.state.serving
    serving._admitted = serving.max_queue
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert error_of(response, 429)["code"] == "queue_full"
    assert response.headers["retry-after"] == "1"
    assert b"iro_requests_rejected_total 1.0" in client.get("/metrics").content


def test_engine_value_error_is_400_without_a_server_error():
    # raise_server_exceptions=True: had the ValueError reached Starlette's ServerErrorMiddleware
    # (which re-raises, so uvicorn drops the connection), the TestClient would raise here.
    client = make_client(ScriptedEngine(error=ValueError("token id 99999 out of vocabulary")))
    error = error_of(client.post("/v1/completions", json={"model": "tiny", "prompt": "x"}), 400)
    assert "out of vocabulary" in error["message"]


def test_unexpected_error_is_500_shaped():
    client = make_client(ScriptedEngine(error=RuntimeError("kaput")), raise_server_exceptions=False)
    error = error_of(client.post("/v1/completions", json={"model": "tiny", "prompt": "x"}), 500)
    assert error["type"] == "server_error" and "kaput" not in error["message"]


def test_metrics_count_by_endpoint_and_status(client):
    client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    client.get("/no/such/route")
    text = client.get("/metrics").text
    assert 'iro_requests_total{endpoint="/v1/completions",status="200"} 1.0' in text
    assert 'iro_requests_total{endpoint="/v1/completions",status="404"} 1.0' in text
    assert 'iro_requests_total{endpoint="unmatched",status="404"} 1.0' in text
    assert 'iro_request_latency_seconds_count{endpoint="/v1/completions"} 2.0' in text
    assert "iro_generation_tokens_total 2.0" in text and "iro_prompt_tokens_total 1.0" in text
