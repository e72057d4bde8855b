"""The I/O-free half of the clients: configuration, retry delays, SSE decoding, error mapping."""

from __future__ import annotations

import email.utils
import time

import httpx
import pytest

from clients import AsyncIroClient, IroClient, errors
from clients.base import BaseIroClient, SSEDecoder, retry_after_seconds
from common.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList


@pytest.fixture
def base(monkeypatch) -> BaseIroClient:
    for name in ("IRO_BASE_URL", "IRO_API_KEY", "IRO_ADMIN_KEY"):
        monkeypatch.delenv(name, raising=False)
    return BaseIroClient(max_retries=3, retry_backoff=0.5, max_retry_delay=3.0)


def status_error(status: int, headers: dict | None = None, code: str | None = None) -> errors.APIStatusError:
    request = httpx.Request("POST", "http://iro.test/v1/chat/completions")
    response = httpx.Response(status, headers=headers, request=request,
                              json={"error": {"message": "x", "type": "t", "code": code}})
    return BaseIroClient._status_error(response)


def test_defaults_and_environment(monkeypatch):
    for name in ("IRO_BASE_URL", "IRO_API_KEY", "IRO_ADMIN_KEY"):
        monkeypatch.delenv(name, raising=False)
    plain = BaseIroClient()
    assert (plain.base_url, plain.api_key, plain.admin_key) == ("http://127.0.0.1:8000", None, None)
    assert plain.max_retries == 2
    monkeypatch.setenv("IRO_BASE_URL", "http://gpu-box:9000/v1/")
    monkeypatch.setenv("IRO_API_KEY", "env-key")
    monkeypatch.setenv("IRO_ADMIN_KEY", "env-admin")
    env = BaseIroClient()
    assert (env.base_url, env.api_key, env.admin_key) == ("http://gpu-box:9000", "env-key", "env-admin")
    explicit = BaseIroClient("http://other/iro", api_key="k", admin_key="a")
    assert (explicit.base_url, explicit.api_key, explicit.admin_key) == ("http://other/iro", "k", "a")
    with pytest.raises(ValueError):
        BaseIroClient(max_retries=-1)


def test_base_url_path_prefix_is_kept():
    with IroClient("http://proxy.test/iro/v1") as client:
        request = client._build_request(client._models_call())
    assert str(request.url) == "http://proxy.test/iro/v1/models"
    assert request.extensions["timeout"]["read"] == 600.0 and request.extensions["timeout"]["connect"] == 10.0


def test_both_clients_share_the_base():
    assert issubclass(IroClient, BaseIroClient) and issubclass(AsyncIroClient, BaseIroClient)
    io_methods = {"models", "chat", "complete", "health", "values", "value", "load_value", "rollback_value",
                  "unload_value", "generate_many", "_send", "_request", "_default_model", "_generate_one"}
    for name in io_methods:  # the mirror: the same I/O methods on both sides, nothing else overridden
        assert name in vars(IroClient) and name in vars(AsyncIroClient), name
    extra = (set(vars(IroClient)) ^ set(vars(AsyncIroClient))) - {"close", "__enter__", "__exit__", "aclose",
                                                                   "__aenter__", "__aexit__"}
    assert not extra


def test_backoff_grows_exponentially_with_jitter_and_is_capped(base):
    error = status_error(503)
    for attempt, nominal in enumerate([0.5, 1.0, 2.0]):
        delays = [base._retry_delay(attempt, error) for _ in range(50)]
        assert all(0.75 * nominal <= d <= nominal for d in delays)
        assert len(set(delays)) > 1  # jittered
    assert base._retry_delay(3, error) is None  # max_retries reached
    capped = BaseIroClient(max_retries=10, retry_backoff=0.5, max_retry_delay=3.0)
    assert all(d <= 3.0 for d in (capped._retry_delay(8, error) for _ in range(20)))


def test_retry_after_is_used_and_capped(base):
    assert base._retry_delay(0, status_error(503, {"Retry-After": "2"})) == 2.0
    assert base._retry_delay(0, status_error(429, {"Retry-After": "120"})) == 3.0
    assert base._retry_delay(0, status_error(503, {"Retry-After": "0"})) == 0.0
    date = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert base._retry_delay(0, status_error(503, {"Retry-After": date})) == 3.0


def test_retry_after_parsing():
    assert retry_after_seconds(httpx.Response(503, headers={"Retry-After": "1.5"})) == 1.5
    assert retry_after_seconds(httpx.Response(503)) is None
    assert retry_after_seconds(httpx.Response(503, headers={"Retry-After": "soon"})) is None
    past = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert retry_after_seconds(httpx.Response(503, headers={"Retry-After": past})) == 0.0
    date = email.utils.formatdate(1000.0 + 30, usegmt=True)
    assert retry_after_seconds(httpx.Response(503, headers={"Retry-After": date}), now=1000.0) == 30.0


@pytest.mark.parametrize(("status", "code", "retried"), [
    (429, None, True), (503, "value_swapping", True), (503, "engine_dead", False), (500, None, False),
    (400, None, False), (401, None, False), (404, None, False), (413, None, False),
])
def test_which_status_errors_are_retried(base, status, code, retried):
    assert (base._retry_delay(0, status_error(status, code=code)) is not None) is retried


def test_which_transport_errors_are_retried(base):
    request = httpx.Request("POST", "http://iro.test/v1/completions")
    expect = {httpx.ConnectError: (errors.ConnectError, True), httpx.ConnectTimeout: (errors.TimeoutError, True),
              httpx.PoolTimeout: (errors.TimeoutError, True), httpx.ReadTimeout: (errors.TimeoutError, False),
              httpx.RemoteProtocolError: (errors.ConnectError, True), httpx.ReadError: (errors.ConnectError, True),
              httpx.UnsupportedProtocol: (errors.TransportError, False)}
    for exc_type, (cls, retried) in expect.items():
        error = base._transport_error(exc_type("boom", request=request), request)
        assert type(error) is cls and error.request is request and isinstance(error.__cause__, exc_type)
        assert (base._retry_delay(0, error) is not None) is retried, exc_type


def test_error_classes():
    assert errors.error_class(503) is errors.ServiceUnavailableError
    assert issubclass(errors.ServiceUnavailableError, errors.InternalServerError)
    assert errors.error_class(504) is errors.InternalServerError and errors.error_class(422) is errors.BadRequestError
    assert errors.status_for_type("rate_limit_error") == 429 and errors.status_for_type("odd") == 500
    assert errors.status_for_type("invalid_request_error", "model_not_found") == 404
    tree = errors.__doc__
    for name in errors.__all__[:14]:  # every class is in the documented tree
        assert name in tree, name


def test_sse_decoder_joins_multiline_data_and_ignores_other_fields():
    d = SSEDecoder()
    out = [d.feed(line) for line in ["event: message", "id: 3", "data: a", "data:b", "", "retry: 10", ""]]
    assert out == [None, None, None, None, "a\nb", None, None]
    d.feed("data: tail")
    assert d.flush() == "tail" and d.flush() is None


def test_request_bodies_are_the_server_schemas(base):
    call = base._chat_call("Hi", model="m", guidance={"value": "v", "mode": "bon"}, stream=True, max_tokens=3)
    assert ChatCompletionRequest.model_validate(call.json).guidance.mode == "bon"
    assert call.chunk is not None and call.result is not None
    call = base._completion_call([1, 2, 3], model="m")
    assert CompletionRequest.model_validate(call.json).prompt == [1, 2, 3] and call.chunk is None
    with pytest.raises(ValueError):
        base._chat_call("Hi", model="m", temperature=5.0)


def test_split_request():
    item = {"prompt": "p", "max_tokens": 2}
    assert BaseIroClient._split_request(item) == ("complete", item)
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "q"}])
    kind, kwargs = BaseIroClient._split_request(request)
    assert kind == "chat" and kwargs["model"] == "m" and kwargs["messages"][0]["content"] == "q"
    with pytest.raises(ValueError, match="stream"):
        BaseIroClient._split_request({"prompt": "p", "stream": True})


def test_pick_model_prefers_the_base():
    cards = ModelList(data=[ModelCard(id="b+v", parent="b"), ModelCard(id="b")])
    assert BaseIroClient._pick_model(cards) == "b"
    with pytest.raises(ValueError):
        BaseIroClient._pick_model(ModelList(data=[]))
