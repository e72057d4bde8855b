"""Bad input, bad credentials and vanishing clients against the real server: every refusal is a
shaped 4xx, aborted clients free their engine requests, and the server keeps serving."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "Hello!"}]
NO_EOS = {"0": -100, "2": -100}  # SmolLM2's end-of-sequence tokens: requests run for max_tokens


def assert_error_shape(response: httpx.Response, status: int, *, code: str | None = None,
                       param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


# (name, method, path, request kwargs, status, code, param)
BAD_REQUESTS = [
    ("malformed json", "POST", "/v1/chat/completions",
     dict(content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"}), 400, "invalid_json", None),
    ("body not an object", "POST", "/v1/completions", dict(json=[1, 2, 3]), 400, None, None),
    ("messages wrong type", "POST", "/v1/chat/completions", dict(json={"model": MODEL, "messages": "hi"}),
     400, "invalid_value", "messages"),
    ("max_tokens wrong type", "POST", "/v1/completions", dict(json={"model": MODEL, "prompt": "x", "max_tokens": "lots"}),
     400, "invalid_value", "max_tokens"),
    ("bad role", "POST", "/v1/chat/completions",
     dict(json={"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}), 400, "invalid_value", None),
    ("empty messages", "POST", "/v1/chat/completions", dict(json={"model": MODEL, "messages": []}),
     400, "invalid_value", "messages"),
    ("missing model", "POST", "/v1/chat/completions", dict(json={"messages": CHAT}), 400, "invalid_value", "model"),
    ("missing prompt", "POST", "/v1/completions", dict(json={"model": MODEL}), 400, "invalid_value", "prompt"),
    ("unknown model", "POST", "/v1/chat/completions", dict(json={"model": "gpt-17", "messages": CHAT}),
     404, "model_not_found", "model"),
    ("unknown model (completions)", "POST", "/v1/completions", dict(json={"model": f"{MODEL}+nope", "prompt": "x"}),
     404, "model_not_found", "model"),
    ("max_tokens beyond context", "POST", "/v1/chat/completions",
     dict(json={"model": MODEL, "messages": CHAT, "max_tokens": 4096}), 400, "context_length_exceeded", "max_tokens"),
    ("prompt longer than context", "POST", "/v1/completions",
     dict(json={"model": MODEL, "prompt": "word " * 3000, "max_tokens": 4}), 400, "context_length_exceeded", "prompt"),
    ("chat longer than context", "POST", "/v1/chat/completions",
     dict(json={"model": MODEL, "messages": [{"role": "user", "content": "word " * 3000}]}),
     400, "context_length_exceeded", "messages"),
    ("negative temperature", "POST", "/v1/chat/completions",
     dict(json={"model": MODEL, "messages": CHAT, "temperature": -0.5}), 400, "invalid_value", "temperature"),
    ("top_p zero", "POST", "/v1/completions", dict(json={"model": MODEL, "prompt": "x", "top_p": 0}),
     400, "invalid_value", "top_p"),
    ("max_tokens zero", "POST", "/v1/completions", dict(json={"model": MODEL, "prompt": "x", "max_tokens": 0}),
     400, "invalid_value", "max_tokens"),
    ("n over the cap", "POST", "/v1/completions", dict(json={"model": MODEL, "prompt": "x", "n": 17}),
     400, "n_too_large", "n"),
    ("n zero", "POST", "/v1/chat/completions", dict(json={"model": MODEL, "messages": CHAT, "n": 0}),
     400, "invalid_value", "n"),
    ("top_k beyond int32 (found by the fuzz: it reached the engine)", "POST", "/v1/chat/completions",
     dict(json={"model": MODEL, "messages": CHAT, "top_k": 2**90}), 400, "invalid_value", "top_k"),
    ("token id beyond vocab", "POST", "/v1/completions",
     dict(json={"model": MODEL, "prompt": [1, 2, 10**9], "max_tokens": 2}), 400, None, "prompt"),
    ("negative token id", "POST", "/v1/completions", dict(json={"model": MODEL, "prompt": [[5, -1]]}), 400, None, "prompt"),
    ("empty prompt", "POST", "/v1/completions", dict(json={"model": MODEL, "prompt": []}), 400, None, "prompt"),
    ("logit_bias key not a token id", "POST", "/v1/completions",
     dict(json={"model": MODEL, "prompt": "x", "logit_bias": {"abc": 1}}), 400, "invalid_value", None),
    ("logit_bias token beyond vocab", "POST", "/v1/chat/completions",
     dict(json={"model": MODEL, "messages": CHAT, "logit_bias": {"99999999": 5}, "stream": True}),
     400, "invalid_value", "logit_bias"),
    ("top_logprobs over 20", "POST", "/v1/chat/completions",
     dict(json={"model": MODEL, "messages": CHAT, "logprobs": True, "top_logprobs": 21}), 400, "invalid_value", "top_logprobs"),
    ("unknown route", "GET", "/v1/does-not-exist", {}, 404, "not_found", None),
    ("unknown top-level route", "POST", "/nowhere", dict(json={}), 404, "not_found", None),
    ("wrong method", "DELETE", "/v1/models", {}, 405, "method_not_allowed", None),
]


@pytest.mark.parametrize("method,path,kwargs,status,code,param",
                         [case[1:] for case in BAD_REQUESTS], ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_is_shaped_and_server_keeps_serving(server, method, path, kwargs, status, code, param):
    with server.http() as http:
        assert_error_shape(http.request(method, path, **kwargs), status, code=code, param=param)
        # same keep-alive connection: the error must not have broken it
        assert http.get("/health").status_code == 200


def test_body_too_large(server):
    with server.http() as http:
        declared = http.post("/v1/completions", content=b"x" * 2_000_001, headers={"content-type": "application/json"})
        assert_error_shape(declared, 413)
        chunked = http.post("/v1/completions", content=iter([b" " * 700_000] * 3),  # no content-length
                            headers={"content-type": "application/json"})
        assert_error_shape(chunked, 413)
    with server.http() as http:
        assert http.get("/health").status_code == 200


def test_missing_or_wrong_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Basic dGVzdC1hcGkta2V5"}):
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions")):
                response = http.request(method, path, json={"model": MODEL, "prompt": "x"})
                error = assert_error_shape(response, 401, code="invalid_api_key")
                assert error["type"] == "authentication_error"
            assert http.get("/health").status_code == 200  # ops endpoints need no key
    bad = openai.OpenAI(base_url=server.v1, api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_sdk_raises_typed_errors(server):
    client = server.openai()
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-17", messages=CHAT, max_tokens=2)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=server.model_id, prompt="x", max_tokens=10_000)
    assert too_long.value.code == "context_length_exceeded" and too_long.value.param == "max_tokens"


def test_still_serving_after_bad_input(server):
    out = server.openai().chat.completions.create(model=server.model_id, messages=CHAT, max_tokens=4)
    assert out.choices[0].message.content and out.usage.completion_tokens > 0


# ----------------------------------------------------------------------------- disconnects
async def engine_in_flight(http: httpx.AsyncClient) -> float:
    text = (await http.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        if family.name == "iro_engine_requests_in_flight":
            return family.samples[0].value
    raise AssertionError("iro_engine_requests_in_flight missing from /metrics")


async def wait_in_flight(http: httpx.AsyncClient, predicate, timeout: float) -> float:
    """Poll the engine in-flight gauge (refreshed every 0.5 s by the server) until `predicate`."""
    deadline = time.monotonic() + timeout
    value = await engine_in_flight(http)
    while not predicate(value) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        value = await engine_in_flight(http)
    return value


def long_request(server, **extra) -> dict:
    # ~2000 tokens with EOS banned: ~35 s of decoding on two cores, far beyond the abort deadline.
    return {"model": server.model_id, "prompt": "Tell me everything about the ocean.", "max_tokens": 2000,
            "logit_bias": NO_EOS, **extra}


def client_for(server, **kw) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {server.api_key}"}, **kw)


async def test_disconnect_non_streaming_aborts_engine_request(server):
    async with client_for(server, timeout=30) as metrics:
        assert await wait_in_flight(metrics, lambda v: v == 0, 30) == 0
        async with client_for(server, timeout=httpx.Timeout(30, read=3)) as impatient:
            request = asyncio.create_task(impatient.post("/v1/completions", json=long_request(server)))
            assert await wait_in_flight(metrics, lambda v: v >= 1, 10) >= 1  # reached the engine
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
                await request
        assert await wait_in_flight(metrics, lambda v: v == 0, 10) == 0, "engine request was not aborted"
    test_still_serving_after_bad_input(server)


async def test_disconnect_streaming_aborts_engine_request(server):
    async with client_for(server, timeout=30) as metrics:
        assert await wait_in_flight(metrics, lambda v: v == 0, 30) == 0
        async with client_for(server, timeout=30) as reader:
            body = long_request(server, stream=True, n=2)
            async with reader.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                lines = response.aiter_lines()
                received = 0
                while received < 3:  # a few SSE events, then hang up
                    if (await anext(lines)).startswith("data: {"):
                        received += 1
                assert await wait_in_flight(metrics, lambda v: v >= 1, 10) >= 1
        assert await wait_in_flight(metrics, lambda v: v == 0, 10) == 0, "engine request was not aborted"
    test_still_serving_after_bad_input(server)


async def test_disconnect_chat_streaming_aborts_engine_request(server):
    async with client_for(server, timeout=30) as metrics:
        async with client_for(server, timeout=30) as reader:
            body = {"model": server.model_id, "messages": CHAT, "max_tokens": 1500, "logit_bias": NO_EOS,
                    "stream": True}
            async with reader.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.aiter_lines()
                assert (await anext(lines)).startswith("data: {")
                assert await wait_in_flight(metrics, lambda v: v >= 1, 10) >= 1
        assert await wait_in_flight(metrics, lambda v: v == 0, 10) == 0, "engine request was not aborted"
    test_still_serving_after_bad_input(server)
