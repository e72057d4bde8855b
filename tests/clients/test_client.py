"""IroClient and AsyncIroClient over httpx.MockTransport; tests taking `make_client` run on both flavours."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from pydantic import ValidationError

from clients import AsyncIroClient, IroClient, errors
from common.admin_protocol import DeletedVersion, PolicyList, PolicyStatus, Unloaded, ValueList, ValueStatus
from common.protocol import (
    ChatCompletionResponse, ChatCompletionStreamResponse, CompletionResponse, CompletionStreamResponse,
    GuidanceParams, ModelList,
)
from tests.clients.conftest import (
    BASE, GUIDANCE_INFO, Recorder, chat_body, chat_chunk, completion_body, error_body, models_body, routes, sse,
)


# ----------------------------------------------------------------------------- requests
def test_chat_request_body_headers_and_parsing(make_client):
    rec = Recorder(routes({"POST /v1/chat/completions": chat_body("Hi there", guidance=GUIDANCE_INFO)}))
    client = make_client(rec, api_key="sk-test")
    answer = client.call("chat", "Hello?", model="m", max_tokens=5, temperature=0.5, seed=7,
                         guidance={"value": "helpful", "w": 2})
    request = rec.requests[0]
    assert (request.method, str(request.url)) == ("POST", "http://iro.test/v1/chat/completions")
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.headers["user-agent"].startswith("iro-client/")
    assert rec.json() == {"model": "m", "messages": [{"role": "user", "content": "Hello?"}], "stream": False,
                          "max_tokens": 5, "temperature": 0.5, "seed": 7, "guidance": {"value": "helpful", "w": 2}}
    assert isinstance(answer, ChatCompletionResponse)
    assert answer.choices[0].message.content == "Hi there"
    assert answer.usage.total_tokens == 5
    assert answer.guidance.value == "helpful" and answer.guidance.versions == [1, 2] and answer.guidance.score == 0.75


def test_chat_accepts_message_lists_and_guidance_models(make_client):
    rec = Recorder(routes({"POST /v1/chat/completions": chat_body()}))
    client = make_client(rec)
    client.call("chat", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                model=f"{BASE}+helpful", guidance=GuidanceParams(mode="bon", k=4))
    body = rec.json()
    assert body["model"] == f"{BASE}+helpful"
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["guidance"] == {"mode": "bon", "k": 4}
    assert "authorization" not in rec.requests[0].headers  # no key configured


def test_unknown_sampling_fields_pass_through(make_client):
    rec = Recorder(routes({"POST /v1/completions": completion_body()}))
    make_client(rec, model=BASE).call("complete", "Hi", repetition_penalty=1.1)
    assert rec.json()["repetition_penalty"] == 1.1


def test_invalid_guidance_fails_before_sending(make_client):
    rec = Recorder(routes({}))
    client = make_client(rec, model=BASE)
    with pytest.raises(ValidationError):
        client.call("chat", "Hi", guidance={"value": "v", "width": 4})
    assert rec.requests == []


def test_completion_request_and_parsing(make_client):
    rec = Recorder(routes({"POST /v1/completions": completion_body(" world")}))
    answer = make_client(rec, model=BASE).call("complete", "Hello", max_tokens=1)
    assert rec.json() == {"model": BASE, "prompt": "Hello", "stream": False, "max_tokens": 1}
    assert isinstance(answer, CompletionResponse) and answer.choices[0].text == " world"


def test_default_model_is_the_base_id_asked_once(make_client):
    rec = Recorder(routes({"GET /v1/models": models_body(f"{BASE}+helpful", BASE),
                           "POST /v1/chat/completions": chat_body(), "POST /v1/completions": completion_body()}))
    client = make_client(rec, api_key="k")
    client.call("chat", "a")
    client.call("complete", "b")
    assert rec.paths() == ["GET /v1/models", "POST /v1/chat/completions", "POST /v1/completions"]
    assert rec.json(1)["model"] == BASE and rec.json(2)["model"] == BASE


def test_models_and_health(make_client):
    rec = Recorder(routes({"GET /v1/models": models_body(BASE, f"{BASE}+v"), "GET /health": {"status": "ok"}}))
    client = make_client(rec)
    models = client.call("models")
    assert isinstance(models, ModelList) and [m.id for m in models.data] == [BASE, f"{BASE}+v"]
    assert client.call("health") == {"status": "ok"}


def test_health_is_not_retried(make_client):
    rec = Recorder([httpx.Response(503, json=error_body("engine starting", type="service_unavailable",
                                                        code="engine_starting"))])
    with pytest.raises(errors.ServiceUnavailableError) as info:
        make_client(rec).call("health")
    assert info.value.code == "engine_starting" and len(rec.requests) == 1


# ----------------------------------------------------------------------------- value admin
def value_status(name: str = "helpful", version: int = 2) -> dict:
    return {"name": name, "model": f"{BASE}+{name}", "serving_version": version, "chain": list(range(1, version + 1)),
            "betas": [1.0] * version, "versions_on_disk": [1, 2], "current_on_disk": 2}


def test_value_admin_calls_use_the_admin_key(make_client):
    rec = Recorder(routes({
        "GET /v1/values": {"object": "list", "data": [value_status()]},
        "GET /v1/values/helpful": value_status(),
        "POST /v1/values/helpful/load": value_status(version=1),
        "POST /v1/values/helpful/rollback": value_status(version=1),
        "DELETE /v1/values/helpful": {"name": "helpful", "deleted": True},
    }))
    client = make_client(rec, api_key="user-key", admin_key="admin-key")
    values = client.call("values")
    assert isinstance(values, ValueList) and values.data[0].serving_version == 2
    assert client.call("value", "helpful").model == f"{BASE}+helpful"
    loaded = client.call("load_value", "helpful", version=1)
    assert isinstance(loaded, ValueStatus) and loaded.serving_version == 1
    client.call("load_value", "helpful")
    assert isinstance(client.call("rollback_value", "helpful"), ValueStatus)
    assert client.call("unload_value", "helpful") == Unloaded(name="helpful")
    assert rec.paths() == ["GET /v1/values", "GET /v1/values/helpful", "POST /v1/values/helpful/load",
                           "POST /v1/values/helpful/load", "POST /v1/values/helpful/rollback",
                           "DELETE /v1/values/helpful"]
    assert rec.json(2) == {"version": 1} and rec.json(3) == {"version": None}
    assert {r.headers["authorization"] for r in rec.requests} == {"Bearer admin-key"}


def test_admin_key_falls_back_to_api_key_and_names_are_escaped(make_client):
    rec = Recorder(routes({"POST /v1/values/a b/rollback": value_status("a b")}))
    client = make_client(rec, api_key="user-key")
    client.call("rollback_value", "a b")
    assert rec.requests[0].url.raw_path == b"/v1/values/a%20b/rollback"
    assert rec.requests[0].headers["authorization"] == "Bearer user-key"


# ----------------------------------------------------------------------------- policy admin
def policy_status(name: str = "pol", version: int | None = 2, refused: list | None = None, **extra) -> dict:
    return {"name": name, "model": name, "root": BASE, "serving_version": version, "versions_on_disk": [1, 2, 3],
            "current_on_disk": 3, "refused": refused or [], "pinned": False, "method": "apa", **extra}


def test_policy_admin_calls_mirror_the_value_ones(make_client):
    rec = Recorder(routes({
        "GET /v1/policies": {"object": "list", "registry": "/srv/policies", "data": [policy_status()]},
        "GET /v1/policies/pol": policy_status(),
        "POST /v1/policies/pol/load": policy_status(version=1, pinned=True),
        "POST /v1/policies/pol/rollback": policy_status(version=1),
        "DELETE /v1/policies/pol": {"name": "pol", "deleted": True},
        "DELETE /v1/policies/pol/versions/1": {"name": "pol", "version": 1, "deleted": True},
    }))
    client = make_client(rec, api_key="user-key", admin_key="admin-key")
    listing = client.call("policies")
    assert isinstance(listing, PolicyList) and listing.registry == "/srv/policies" and listing.data[0].method == "apa"
    assert client.call("policy", "pol").serving_version == 2
    pinned = client.call("load_policy", "pol", version=1)
    assert isinstance(pinned, PolicyStatus) and pinned.serving_version == 1 and pinned.pinned
    client.call("load_policy", "pol")  # no version: follow CURRENT (unpin)
    assert client.call("rollback_policy", "pol").serving_version == 1
    assert client.call("unload_policy", "pol") == Unloaded(name="pol")
    assert client.call("delete_policy_version", "pol", 1) == DeletedVersion(name="pol", version=1)
    assert rec.paths() == ["GET /v1/policies", "GET /v1/policies/pol", "POST /v1/policies/pol/load",
                           "POST /v1/policies/pol/load", "POST /v1/policies/pol/rollback", "DELETE /v1/policies/pol",
                           "DELETE /v1/policies/pol/versions/1"]
    assert rec.json(2) == {"version": 1} and rec.json(3) == {"version": None}
    assert {r.headers["authorization"] for r in rec.requests} == {"Bearer admin-key"}


@pytest.mark.parametrize("method,path,status", [("wait_policy", "/v1/policies/pol", policy_status),
                                                ("wait_value", "/v1/values/pol", lambda **kw: value_status("pol", **kw))])
def test_wait_polls_until_the_version_serves(make_client, method, path, status):
    rec = Recorder([httpx.Response(200, json=status(version=1)), httpx.Response(200, json=status(version=1)),
                    httpx.Response(200, json=status(version=2))])
    client = make_client(rec)
    slept = client.fake_time()
    assert client.call(method, "pol", 2, poll_interval=0.5).serving_version == 2
    assert slept == [0.5, 0.5] and rec.paths() == [f"GET {path}"] * 3


def test_wait_raises_when_the_version_is_refused_or_late(make_client):
    refusal = {"version": 3, "reason": "hash_mismatch: pol@3/adapter_model.safetensors", "at": 1.0}
    rec = Recorder([httpx.Response(200, json=policy_status(refused=[refusal]))])
    client = make_client(rec)
    client.fake_time()
    with pytest.raises(errors.NotServingError, match="refused pol@3: hash_mismatch") as info:
        client.call("wait_policy", "pol", 3)
    assert info.value.refused.reason.startswith("hash_mismatch") and info.value.status.serving_version == 2
    rec = Recorder([httpx.Response(200, json=policy_status())])
    client = make_client(rec)
    slept = client.fake_time()
    with pytest.raises(errors.NotServingError, match="deadline") as info:
        client.call("wait_policy", "pol", 3, timeout=2.0, poll_interval=0.5)
    assert info.value.refused is None and slept == [0.5] * 4 and len(rec.requests) == 5


# ----------------------------------------------------------------------------- streaming
def test_chat_stream_yields_chunks_until_done(make_client):
    body = sse(chat_chunk("Hel"), chat_chunk("lo"), chat_chunk(None, finish="stop"),
               chat_chunk(None, usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
                          guidance=GUIDANCE_INFO)) + b"data: {\"after\": \"done is ignored\"}\n\n"
    rec = Recorder([httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})])
    chunks = make_client(rec, model=BASE).stream("chat", "Hi", stream_options={"include_usage": True})
    assert all(isinstance(c, ChatCompletionStreamResponse) for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert chunks[-1].usage.total_tokens == 3 and chunks[-1].guidance.value == "helpful"
    assert rec.json()["stream"] is True and rec.requests[0].headers["accept"] == "text/event-stream"


def test_completion_stream_tolerates_comments_and_missing_done(make_client):
    chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": BASE,
             "choices": [{"index": 0, "text": " there", "finish_reason": None}]}
    body = b": keep-alive\n\n" + sse(chunk, done=False)
    rec = Recorder([httpx.Response(200, content=body)])
    chunks = make_client(rec, model=BASE).stream("complete", "Hi")
    assert [type(c) for c in chunks] == [CompletionStreamResponse] and chunks[0].choices[0].text == " there"


@pytest.mark.parametrize(("error", "cls", "status"), [
    (error_body("generation failed: RuntimeError", type="service_unavailable", code="engine_error"),
     errors.ServiceUnavailableError, 503),
    (error_body("bad stop", param="stop", code="invalid_value"), errors.BadRequestError, 400),
    (error_body("boom", type="server_error"), errors.InternalServerError, 500),
])
def test_error_event_in_stream_raises_mapped_error(make_client, error, cls, status):
    rec = Recorder([httpx.Response(200, content=sse(chat_chunk("partial"), error))])
    with pytest.raises(cls) as info:
        make_client(rec, model=BASE).stream("chat", "Hi")
    exc = info.value
    assert type(exc) is cls and exc.status_code == status and exc.message == error["error"]["message"]
    assert exc.code == error["error"]["code"] and exc.param == error["error"]["param"]
    assert exc.request.url.path == "/v1/chat/completions" and exc.response.status_code == 200


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("status", "cls"), [
    (400, errors.BadRequestError), (401, errors.AuthenticationError), (403, errors.PermissionDeniedError),
    (404, errors.NotFoundError), (409, errors.ConflictError), (413, errors.PayloadTooLargeError),
    (429, errors.RateLimitError), (500, errors.InternalServerError), (502, errors.InternalServerError),
    (503, errors.ServiceUnavailableError), (418, errors.APIStatusError),
])
def test_status_errors_are_typed_and_carry_the_error_body(make_client, status, cls):
    body = error_body(f"failed with {status}", type="invalid_request_error", param="guidance.w", code=f"c{status}")
    rec = Recorder([httpx.Response(status, json=body)])
    with pytest.raises(errors.APIStatusError) as info:
        make_client(rec, model=BASE, max_retries=0).call("chat", "Hi")
    exc = info.value
    assert type(exc) is cls and isinstance(exc, errors.IroClientError)
    assert (exc.status_code, exc.message, exc.type, exc.param, exc.code) == (
        status, f"failed with {status}", "invalid_request_error", "guidance.w", f"c{status}")
    assert exc.request.url.path == "/v1/chat/completions" and exc.response.status_code == status
    assert str(exc) == f"{status} failed with {status} (param=guidance.w, code=c{status})"


def test_error_without_openai_body_uses_the_text(make_client):
    rec = Recorder([httpx.Response(502, text="Bad gateway (proxy)")])
    with pytest.raises(errors.InternalServerError) as info:
        make_client(rec, model=BASE).call("chat", "Hi")
    assert info.value.message == "Bad gateway (proxy)" and info.value.body is None and info.value.code is None


# ----------------------------------------------------------------------------- retries
def busy(status: int = 503, retry_after: str | None = None, code: str = "value_swapping") -> httpx.Response:
    kind = "rate_limit_error" if status == 429 else "service_unavailable"
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(status, json=error_body("busy", type=kind, code=code), headers=headers)


@pytest.mark.parametrize("status", [429, 503])
def test_retries_then_succeeds(make_client, status):
    rec = Recorder([busy(status), busy(status), httpx.Response(200, json=chat_body("ok"))])
    answer = make_client(rec, model=BASE, max_retries=2).call("chat", "Hi")
    assert answer.choices[0].message.content == "ok" and len(rec.requests) == 3


def test_retry_after_is_honoured_but_capped(make_client):
    rec = Recorder([busy(503, retry_after="30"), httpx.Response(200, json=chat_body("ok"))])
    client = make_client(rec, model=BASE, max_retry_delay=0.2, retry_backoff=0.0)
    slept = client.fake_time()
    client.call("chat", "Hi")
    assert len(rec.requests) == 2 and slept == [0.2]


def test_bad_request_is_not_retried(make_client):
    rec = Recorder([httpx.Response(400, json=error_body("no", param="messages"))])
    with pytest.raises(errors.BadRequestError):
        make_client(rec, model=BASE, max_retries=3).call("chat", "Hi")
    assert len(rec.requests) == 1


def test_dead_engine_is_not_retried(make_client):
    rec = Recorder([busy(503, code="engine_dead")])
    with pytest.raises(errors.ServiceUnavailableError):
        make_client(rec, model=BASE, max_retries=3).call("chat", "Hi")
    assert len(rec.requests) == 1


def test_exhausted_retries_raise_the_last_error(make_client):
    rec = Recorder([busy(503)])
    with pytest.raises(errors.ServiceUnavailableError) as info:
        make_client(rec, model=BASE, max_retries=2).call("chat", "Hi")
    assert len(rec.requests) == 3 and info.value.code == "value_swapping"


def test_connection_errors_are_retried_then_raised(make_client):
    rec = Recorder([httpx.ConnectError("refused"), httpx.Response(200, json=chat_body("ok"))])
    assert make_client(rec, model=BASE).call("chat", "Hi").choices[0].message.content == "ok"
    rec = Recorder([httpx.ConnectError("refused")])
    with pytest.raises(errors.ConnectError) as info:
        make_client(rec, model=BASE, max_retries=1).call("chat", "Hi")
    assert len(rec.requests) == 2 and isinstance(info.value.__cause__, httpx.ConnectError)
    assert isinstance(info.value, errors.TransportError) and info.value.request.url.path == "/v1/chat/completions"


def test_read_timeouts_are_not_retried(make_client):
    rec = Recorder([httpx.ReadTimeout("slow")])
    with pytest.raises(errors.TimeoutError):
        make_client(rec, model=BASE, max_retries=2).call("chat", "Hi")
    assert len(rec.requests) == 1
    rec = Recorder([httpx.ConnectTimeout("slow"), httpx.Response(200, json=chat_body())])
    make_client(rec, model=BASE).call("chat", "Hi")
    assert len(rec.requests) == 2


# ----------------------------------------------------------------------------- generate_many
def test_generate_many_yields_every_index_once(make_client):
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/chat/completions":
            return httpx.Response(200, json=chat_body(request.read().decode()[-12:]))
        return httpx.Response(200, json=completion_body())

    requests = [{"messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 4} if i % 2 else
                {"prompt": f"p{i}", "model": "other"} for i in range(7)]
    results = make_client(Recorder(answer), model=BASE).generate_many(iter(requests), concurrency=3)
    assert sorted(i for i, _ in results) == list(range(7))
    for i, result in results:
        assert isinstance(result, ChatCompletionResponse if i % 2 else CompletionResponse)


def test_generate_many_errors(make_client):
    def answer(request: httpx.Request) -> httpx.Response:
        if b'"bad"' in request.read():
            return httpx.Response(400, json=error_body("bad prompt", param="prompt"))
        return httpx.Response(200, json=completion_body())

    requests = [{"prompt": "ok"}, {"prompt": "bad"}, {"prompt": "ok"}]
    client = make_client(Recorder(answer), model=BASE)
    results = dict(client.generate_many(requests, concurrency=1, return_exceptions=True))
    assert isinstance(results[1], errors.BadRequestError) and results[1].param == "prompt"
    assert isinstance(results[0], CompletionResponse) and isinstance(results[2], CompletionResponse)
    with pytest.raises(errors.BadRequestError):
        client.generate_many(requests, concurrency=2)
    with pytest.raises(ValueError, match="messages"):
        client.generate_many([{"max_tokens": 3}])


class InFlight:
    """Counts concurrent requests. No timing: the first requests wait until three are in flight, and
    the one whose prompt starts with "slow" until every other request has been yielded."""

    def __init__(self, others: int = 7):
        self.now = self.peak = self.done = self.yielded = 0
        self.others = others

    def enter(self, request: httpx.Request) -> bool:
        self.now += 1
        self.peak = max(self.peak, self.now)
        return b'"slow' in request.read()

    def may_leave(self, slow: bool) -> bool:
        return self.yielded == self.others if slow else self.peak >= 3

    def leave(self, slow: bool) -> httpx.Response:
        self.now -= 1
        self.done += not slow
        return httpx.Response(200, json=completion_body())


def test_sync_generate_many_bounds_concurrency_and_yields_in_finish_order():
    counter, cond = InFlight(), threading.Condition()

    def handler(request):
        with cond:
            slow = counter.enter(request)
            assert cond.wait_for(lambda: counter.may_leave(slow), timeout=30)
            response = counter.leave(slow)
            cond.notify_all()
            return response

    requests = [{"prompt": "slow"}] + [{"prompt": f"p{i}"} for i in range(7)]
    order = []
    with IroClient("http://iro.test", model=BASE, transport=httpx.MockTransport(handler)) as client:
        for i, _ in client.generate_many(requests, concurrency=3):
            with cond:  # the slow request leaves once the other seven have been yielded, not only answered
                order.append(i)
                counter.yielded += 1
                cond.notify_all()
    assert counter.peak == 3 and sorted(order) == list(range(8)) and order[-1] == 0


async def test_async_generate_many_bounds_concurrency_and_yields_in_finish_order():
    counter, cond = InFlight(), asyncio.Condition()

    async def handler(request):
        async with cond:
            slow = counter.enter(request)
            await asyncio.wait_for(cond.wait_for(lambda: counter.may_leave(slow)), timeout=30)
            response = counter.leave(slow)
            cond.notify_all()
            return response

    requests = [{"prompt": "slow"}] + [{"prompt": f"p{i}"} for i in range(7)]
    order = []
    async with AsyncIroClient("http://iro.test", model=BASE, transport=httpx.MockTransport(handler)) as client:
        async for i, _ in client.generate_many(iter(requests), concurrency=3):
            async with cond:
                order.append(i)
                counter.yielded += 1
                cond.notify_all()
    assert counter.peak == 3 and sorted(order) == list(range(8)) and order[-1] == 0
