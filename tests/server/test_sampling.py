"""One sampling object end to end: every field of `Sampling` comes from the request, reaches the
engine unchanged on the plain and the guided path, and becomes part of vLLM's SamplingParams.
A field added to `Sampling` (or to the API) that misses one of these hops fails here."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import replace

import numpy as np
import pytest

from common.protocol import ChatCompletionRequest, CompletionRequest
from common.sampling import Sampling, StructuredOutput
from server.engine import EngineRequest, Sample
from server.guided import GuidedGenerator
from server.openai.serving import OpenAIServing
from tests.server.conftest import OneValue, ScriptedEngine

# A non-default value for every field of Sampling, and the request fields that carry it.
CHANGED = {
    "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "presence_penalty": 0.5,
    "frequency_penalty": 0.25, "repetition_penalty": 1.3, "logit_bias": ((7, -100.0), (9, 2.0)), "seed": 11,
    "stop": ("zz",), "stop_token_ids": (3,), "ignore_eos": True, "min_tokens": 2, "logprobs": 2,
    "structured": StructuredOutput("json_schema", '{"type": "object"}'),
}
REQUEST_FIELDS = {
    "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "presence_penalty": 0.5,
    "frequency_penalty": 0.25, "repetition_penalty": 1.3, "logit_bias": {"9": 2.0, "7": -100}, "seed": 11,
    "stop": ["zz"], "stop_token_ids": [3], "ignore_eos": True, "min_tokens": 2, "logprobs": 2,
    "response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": {"type": "object"}}},
}


def test_every_field_has_a_test_value():
    assert set(CHANGED) == {f.name for f in dataclasses.fields(Sampling)}


def test_every_field_comes_from_the_request():
    sampling = CompletionRequest(model="m", prompt="x", **REQUEST_FIELDS).to_sampling()
    assert sampling == Sampling(**CHANGED)
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}],
                                 **(REQUEST_FIELDS | {"logprobs": True, "top_logprobs": 2})).to_sampling()
    assert chat == Sampling(**CHANGED)


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_every_field_reaches_vllm_sampling_params(name):
    pytest.importorskip("vllm")
    from server.engine import to_sampling_params

    def attrs(params):
        return {k: repr(getattr(params, k)) for k in dir(params) if not k.startswith("_")
                and not callable(getattr(params, k))}

    request = EngineRequest([1, 2, 3], n=1, max_tokens=8)
    base = attrs(to_sampling_params(request))
    changed = attrs(to_sampling_params(replace(request, sampling=Sampling(**{name: CHANGED[name]}))))
    assert base != changed, f"Sampling.{name} does not reach vLLM's SamplingParams"


def test_chunk_min_tokens_are_what_is_left_and_value_heads_keep_logprobs_free():
    pytest.importorskip("vllm")
    from server.engine import to_sampling_params

    params = to_sampling_params(EngineRequest([1], n=2, max_tokens=4, sampling=Sampling(min_tokens=9)))
    assert params.min_tokens == 4  # never more than the chunk may generate
    heads = ((0.0, 1.0), (1.0, 0.0))
    params = to_sampling_params(EngineRequest([1], n=1, max_tokens=4, value_heads=heads, grammar_prefix=3,
                                              sampling=Sampling(structured=StructuredOutput("json_object"))))
    assert params.logprobs == 1 and params.structured_outputs.json_object and params.flat_logprobs
    assert params.extra_args["iro_grammar_prefix"] == 3


# ----------------------------------------------------------------------------- plain and guided paths
def test_plain_path_passes_the_request_sampling_unchanged():
    engine = ScriptedEngine()
    serving = OpenAIServing(engine, max_n=4)
    body = REQUEST_FIELDS | {"stop_token_ids": [3], "max_tokens": 4}
    request = CompletionRequest(model="tiny", prompt="hi", **body)
    asyncio.run(serving.create_completion(request))
    (_, sent), = engine.requests
    assert sent.sampling == request.to_sampling()


class _Scorer:
    async def values(self, chain, items):
        return np.array([[float(len(it.token_ids))] for it in items])


class _ChunkEngine(ScriptedEngine):
    def __init__(self):
        super().__init__()
        self.chunks: list[EngineRequest] = []

    async def sample(self, request):
        self.chunks.append(request)
        return [Sample([65] * request.max_tokens, "", "length") for _ in range(request.n)]


@pytest.mark.parametrize("mode", ["cbs", "bon"])
def test_guided_path_passes_the_request_sampling_to_every_chunk(mode):
    engine = _ChunkEngine()
    guided = GuidedGenerator(engine, _Scorer(), OneValue())
    serving = OpenAIServing(engine, max_n=4, guided=guided, values=OneValue())
    fields = {k: v for k, v in REQUEST_FIELDS.items() if k != "logprobs"}  # refused with guidance
    request = CompletionRequest(model="tiny+v", prompt="hi", max_tokens=6, guidance={"mode": mode}, **fields)
    body = asyncio.run(serving.create_completion(request))
    assert body.guidance.mode == mode and engine.chunks
    expected = request.to_sampling()
    for chunk in engine.chunks:
        done = len(chunk.prompt_ids) - len(b"hi")
        # only the seed (one per chunk, derived from the request's) and what is left of min_tokens differ
        assert chunk.sampling.seed is not None and chunk.sampling.seed != expected.seed
        assert replace(chunk.sampling, seed=expected.seed) == replace(expected, min_tokens=max(0, 2 - done))
        assert chunk.grammar_prefix == done  # response_format continues after the beam's tokens


def test_guided_logprobs_are_refused_naming_the_field():
    from server.errors import InvalidRequestError

    engine = _ChunkEngine()
    serving = OpenAIServing(engine, max_n=4, guided=GuidedGenerator(engine, _Scorer(), OneValue()), values=OneValue())
    chat = ChatCompletionRequest(model="tiny+v", messages=[{"role": "user", "content": "x"}], logprobs=True,
                                 max_tokens=4)
    with pytest.raises(InvalidRequestError) as exc:
        asyncio.run(serving.create_chat_completion(chat))
    assert exc.value.param == "logprobs" and not engine.chunks


def test_engine_values_are_read_from_flat_or_per_token_logprobs():
    from vllm.logprobs import FlatLogprobs, Logprob

    from server.engine import token_values

    positions = [{0: Logprob(0.5), 1: Logprob(-2.0)}, {0: Logprob(1.5), 1: Logprob(3.0)}]
    flat = FlatLogprobs()
    flat.extend(positions)
    assert token_values(flat, 2) == token_values(positions, 2) == [[0.5, -2.0], [1.5, 3.0]]
    assert token_values(flat, 1) == [[0.5], [1.5]]
