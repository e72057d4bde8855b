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


def test_bare_value_error_is_a_clean_500_without_its_text():
    # Only our own typed errors (and vLLM's VLLMClientError, turned into ours by server.engine) are
    # refusals; a bare ValueError is a bug and its raw text is no message for a client. With
    # raise_server_exceptions=True the TestClient would raise had the error reached Starlette's
    # ServerErrorMiddleware (which re-raises, so uvicorn drops the connection).
    client = make_client(ScriptedEngine(error=ValueError("Out of range float values are not JSON compliant")))
    error = error_of(client.post("/v1/completions", json={"model": "tiny", "prompt": "x"}), 500)
    assert error["type"] == "server_error" and "JSON" not in error["message"]


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


# ----------------------------------------------------------------------------- hostile input (issue 25)
def post_raw(client, path: str, raw: str):
    return client.post(path, content=raw.encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize("raw,param", [
    ('{"model": "tiny", "prompt": "a\\ud800"}', "prompt"),
    ('{"model": "tiny", "prompt": "a", "stop": "\\udfff"}', "stop"),
    ('{"model": "tiny", "prompt": "a", "stop": ["x", "\\ud800"]}', "stop.1"),
    ('{"model": "tiny\\ud800", "prompt": "a"}', "model"),
    ('{"model": "tiny", "prompt": "a", "logit_bias": {"5": 1}, "user": "\\ud83d"}', "user"),
])
def test_lone_surrogates_are_400_naming_the_field(engine, raw, param):
    client = make_client(engine)
    error = error_of(post_raw(client, "/v1/completions", raw), 400)
    assert error["param"] == param and "surrogate" in error["message"] and error["code"] == "invalid_value"
    assert engine.requests == []


def test_a_valid_surrogate_pair_is_text():
    engine = ScriptedEngine()
    client = make_client(engine)
    response = post_raw(client, "/v1/completions", '{"model": "tiny", "prompt": "\\ud83d\\ude00", "max_tokens": 1}')
    assert response.status_code == 200, response.text
    assert engine.requests[0][0] == list("\U0001F600".encode())


@pytest.mark.parametrize("raw,param", [
    ('"temperature": NaN', "temperature"), ('"top_p": Infinity', "top_p"),
    ('"guidance": {"value": "v", "beta": Infinity}', "guidance.beta"),
    ('"logit_bias": {"5": -Infinity}', "logit_bias.5"),
])
def test_non_finite_numbers_are_400(client, raw, param):
    error = error_of(post_raw(client, "/v1/completions", '{"model": "tiny", "prompt": "a", ' + raw + "}"), 400)
    assert error["param"] == param and "finite" in error["message"]


@pytest.mark.parametrize("extra,param,limit", [
    ({"stop": [str(i) for i in range(17)]}, "stop", "16"),
    ({"stop": "x" * 257}, "stop", "256"),
    ({"stop_token_ids": list(range(65))}, "stop_token_ids", "64"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "300"),
    ({"prompt": ["a"] * 65}, "prompt", "64"),
])
def test_published_list_bounds_are_400_naming_field_and_limit(client, extra, param, limit):
    error = error_of(client.post("/v1/completions", json={"model": "tiny", "prompt": "a", **extra}), 400)
    assert error["param"] == param and limit in error["message"], error


class CountingTokenizer(ScriptedEngine().tokenizer.__class__):
    def __init__(self):
        self.encoded = 0
        self.on_event_loop = 0

    def encode(self, text, add_special_tokens=False):
        import asyncio

        self.encoded += 1
        try:
            asyncio.get_running_loop()
            self.on_event_loop += 1
        except RuntimeError:  # a worker thread: no event loop runs here
            pass
        return super().encode(text, add_special_tokens)


def limited_client(**limits):
    from server.openai.serving import Limits, OpenAIServing

    engine = ScriptedEngine()
    engine._tokenizer = CountingTokenizer()
    client = make_client(engine)
    client.app.state.serving = OpenAIServing(engine, max_n=4, max_queue=8, metrics=client.app.state.metrics,
                                             limits=Limits(**limits))
    return client, engine


@pytest.mark.parametrize("extra,param,limit", [
    ({"stop": ["a", "b", "c"]}, "stop", 2), ({"stop_token_ids": [1, 2, 3]}, "stop_token_ids", 2),
    ({"logit_bias": {"1": 1, "2": 1, "3": 1}}, "logit_bias", 2), ({"prompt": ["a", "b", "c"]}, "prompt", 2),
])
def test_lower_limits_from_settings_are_checked_before_tokenizing(extra, param, limit):
    client, engine = limited_client(max_stop=2, max_stop_token_ids=2, max_logit_bias=2, max_prompts=2)
    error = error_of(client.post("/v1/completions", json={"model": "tiny", "prompt": "a", **extra}), 400)
    assert error["param"] == param and f"at most {limit}" in error["message"]
    assert engine.tokenizer.encoded == 0 and engine.requests == []


def test_prompts_are_tokenized_off_the_event_loop():
    client, engine = limited_client()
    assert client.post("/v1/completions", json={"model": "tiny", "prompt": ["ab", "cd"], "max_tokens": 1}).status_code == 200
    assert client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "max_tokens": 1}).status_code == 200
    assert engine.tokenizer.encoded == 3 and engine.tokenizer.on_event_loop == 0


async def test_a_stalled_body_gets_408_and_a_closed_connection():
    import asyncio

    from server.app import BodyLimitMiddleware, install_error_handlers
    from fastapi import Body, FastAPI

    app = FastAPI()
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(body: dict = Body(...)):
        return body

    guarded = BodyLimitMiddleware(app, limit=4096, timeout=0.05)
    stalled = asyncio.Event()  # never set: the client sent its headers and part of the body, then stopped
    messages = [{"type": "http.request", "body": b'{"a": ', "more_body": True}]

    async def receive():
        if messages:
            return messages.pop(0)
        await stalled.wait()

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/echo", "raw_path": b"/echo", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
             "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1), "root_path": ""}
    await guarded(scope, receive, send)
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    assert b"request_timeout" in sent[1]["body"]
