"""The CBS / BoN search loop with a scripted engine and scorer (no vLLM, no model)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import numpy as np
import pytest

from common.sampling import Sampling
from server.engine import EngineClient, EngineRequest, Sample
from server.search import Searcher, SearchParams, chunk_seed, common_prefix, cut_at_stop

EOS = 0


def decode(ids):  # token i -> letter; EOS is invisible
    return "".join(chr(ord("a") + i - 1) for i in ids if i != EOS)


class ScriptedEngine(EngineClient):
    """Samples tokens 1..9 uniformly (seeded per request); `eos_after` ends a chunk at token 9."""

    model_id, max_model_len, eos_token_ids = "scripted", 4096, [EOS]

    def __init__(self, eos_on_9: bool = False, script=None):
        self.eos_on_9 = eos_on_9
        self.script = script
        self.requests: list[EngineRequest] = []

    @property
    def tokenizer(self):
        return None

    def stream(self, request, request_id, *, delta=False):  # pragma: no cover - unused by the search
        raise NotImplementedError

    async def sample(self, request: EngineRequest) -> list[Sample]:
        self.requests.append(request)
        await asyncio.sleep(0)
        if self.script is not None:
            return self.script(request)
        rng = random.Random(request.sampling.seed if request.sampling.seed is not None else hash(tuple(request.prompt_ids)))
        out = []
        for _ in range(request.n):
            ids, reason = [], "length"
            for _ in range(request.max_tokens):
                t = rng.randint(1, 9)
                ids.append(t)
                if self.eos_on_9 and t == 9:
                    ids.append(EOS)
                    reason = "stop"
                    break
            out.append(Sample(ids, decode(ids), reason))
        return out


@dataclass
class Chain:
    betas: list
    links: tuple = ((None, 1.0),)


class CountingScorer:
    """V = number of `target` tokens in the response part of the sequence."""

    def __init__(self, prompt_len: int, target: int = 7, bonus: dict | None = None):
        self.prompt_len, self.target, self.bonus = prompt_len, target, bonus or {}
        self.calls = 0

    async def values(self, chain, items):
        self.calls += 1
        rows = []
        for it in items:
            resp = list(it.token_ids[self.prompt_len:])
            v = resp.count(self.target) + sum(b for t, b in self.bonus.items() if resp and resp[-1] == t)
            rows.append([float(v)])
        return np.array(rows)


PROMPT = [3, 3, 3]


def run(engine, scorer, **kw):
    kw = {"seed": 1} | kw
    sampling = Sampling(temperature=0.7, seed=kw.pop("seed"), stop=kw.pop("stop", ()))
    params = SearchParams(**({"mode": "cbs", "w": 2, "k": 4, "l": 2, "max_tokens": 8, "sampling": sampling} | kw))
    return asyncio.run(Searcher(engine, scorer, decode=decode).run(Chain([1.0]), PROMPT, params))


def test_cbs_finds_the_sequences_the_scorer_prefers():
    guided = [run(ScriptedEngine(), CountingScorer(3), seed=s).beams[0] for s in range(10)]
    plain_rng = random.Random(0)
    plain = [[plain_rng.randint(1, 9) for _ in range(8)].count(7) for _ in range(200)]
    guided_mean = np.mean([b.token_ids.count(7) for b in guided])
    assert guided_mean >= 3 * max(np.mean(plain), 0.5)
    assert all(len(b.token_ids) == 8 and b.finish_reason == "length" for b in guided)


def test_finished_beams_stay_in_the_pool_and_can_win():
    # A beam that ends (EOS after token 9) gets a large value and must survive later steps.
    result = run(ScriptedEngine(eos_on_9=True), CountingScorer(3, bonus={EOS: 100.0}), max_tokens=12)
    best = result.beams[0]
    assert best.finished and best.finish_reason == "stop"
    assert best.token_ids[-2:] == [9, EOS]
    assert result.candidates_generated > 8


def test_stop_string_across_chunk_boundary_is_cut():
    # chunk 1 ends with "c", chunk 2 starts with "d": the stop string "cd" spans the boundary.
    def script(req):
        step = (len(req.prompt_ids) - len(PROMPT)) // 2
        chunk = [[1, 3], [4, 5], [6, 6], [6, 6]][min(step, 3)]
        return [Sample(chunk, decode(chunk), "length") for _ in range(req.n)]

    result = run(ScriptedEngine(script=script), CountingScorer(3), stop=("cd",), max_tokens=8)
    assert result.beams[0].text == "a"
    assert result.beams[0].finish_reason == "stop"


def test_n_greater_than_one_returns_distinct_beams_best_first():
    result = run(ScriptedEngine(), CountingScorer(3), w=4, n=3)
    texts = [b.text for b in result.beams]
    assert len(texts) == 3 and len(set(texts)) == 3
    scores = [b.score for b in result.beams]
    assert scores == sorted(scores, reverse=True)


def test_bon_returns_the_highest_scoring_sample():
    engine, scorer = ScriptedEngine(), CountingScorer(3)
    result = run(engine, scorer, mode="bon", k=16, max_tokens=6)
    assert len(engine.requests) == 1 and engine.requests[0].n == 16
    assert result.candidates_generated == 16 and result.candidates_scored == 16
    samples = asyncio.run(ScriptedEngine().sample(engine.requests[0]))
    assert result.beams[0].token_ids.count(7) == max(s.token_ids.count(7) for s in samples)


def test_chunk_requests_are_token_prompts_that_extend_the_beams():
    engine = ScriptedEngine()
    result = run(engine, CountingScorer(3), w=2, k=3, l=2, max_tokens=6)
    first, later = engine.requests[0], engine.requests[1:]
    assert first.prompt_ids == PROMPT and first.n == 6  # w*k samples of the prompt alone
    assert all(r.n == 3 and r.prompt_ids[:3] == PROMPT and r.max_tokens <= 2 for r in later)
    assert result.chunks == len(engine.requests)
    assert result.completion_tokens == result.candidates_generated * 2


@pytest.mark.parametrize("prompt_len, align, l, max_tokens, lengths", [
    (3, 1, 2, 8, [2, 2, 2, 2]),          # no alignment: chunks of l
    (3, 16, 8, 48, [14, 8, 8, 8, 8, 2]),  # prompt 3 + 14 = 17: every boundary 1 past a multiple of gcd(8, 16)
    (21, 16, 8, 48, [12, 8, 8, 8, 8, 4]),  # 21 + 12 = 33
    (25, 16, 8, 48, [8, 8, 8, 8, 8, 8]),  # already there
    (3, 16, 8, 10, [10]),                 # the first chunk never exceeds max_tokens
    (5, 32, 16, 40, [28, 12]),            # l a multiple of the block: 1 past whole blocks
])
def test_aligned_chunks_put_every_boundary_on_the_prefix_cache_grid(prompt_len, align, l, max_tokens, lengths):
    engine = ScriptedEngine()
    params = SearchParams(mode="cbs", w=2, k=2, l=l, max_tokens=max_tokens, sampling=Sampling(seed=1), align=align)
    result = asyncio.run(Searcher(engine, CountingScorer(prompt_len), decode=decode).run(
        Chain([1.0]), [3] * prompt_len, params))
    assert len(result.beams[0].token_ids) == max_tokens
    by_step: dict[int, set] = {}
    for r in engine.requests:
        by_step.setdefault(len(r.prompt_ids), set()).add(r.max_tokens)
    assert [m for _, ms in sorted(by_step.items()) for m in ms] == lengths
    unit = np.gcd(l, align)
    assert all(n % unit == 1 % unit for n in sorted(by_step)[1:])  # every later chunk starts 1 past the grid


def test_same_seed_same_result_different_seed_differs():
    a = run(ScriptedEngine(), CountingScorer(3), seed=5).beams[0].token_ids
    b = run(ScriptedEngine(), CountingScorer(3), seed=5).beams[0].token_ids
    c = [run(ScriptedEngine(), CountingScorer(3), seed=s).beams[0].token_ids for s in range(6, 10)]
    assert a == b
    assert any(x != a for x in c)
    assert chunk_seed(5, 0, 1) != chunk_seed(5, 0, 2) and chunk_seed(None, 1) is None


@pytest.mark.parametrize("text,stops,expected", [("hello world", ["o w"], ("hell", True)),
                                                 ("abc", ["x"], ("abc", False)),
                                                 ("abcabc", ["c", "b"], ("a", True))])
def test_cut_at_stop(text, stops, expected):
    assert cut_at_stop(text, stops) == expected


def test_common_prefix():
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == [1, 2]
    assert common_prefix([]) == []


class HeadEngine(ScriptedEngine):
    """Also evaluates value heads: each sampled token's "head output" is 1 for token 7, else 0."""

    max_value_heads = 2

    async def sample(self, request: EngineRequest) -> list[Sample]:
        samples = await super().sample(request)
        if request.value_heads:
            for s in samples:
                s.token_values = [[float(t == 7)] * len(request.value_heads) for t in s.token_ids]
        return samples


@dataclass
class HeadChain(Chain):
    value_heads: tuple | None = ((0.5, -1.0, 0.0),)


def test_engine_heads_value_the_candidates_without_the_scorer():
    scorer, engine = CountingScorer(3, target=1), HeadEngine()  # the scorer would prefer 1s
    params = SearchParams(mode="cbs", w=2, k=4, l=2, max_tokens=8, sampling=Sampling(seed=3))
    chain = HeadChain([1.0])
    result = asyncio.run(Searcher(engine, scorer, decode=decode).run(chain, PROMPT, params))
    assert scorer.calls == 0
    assert engine.requests and all(r.value_heads == chain.value_heads for r in engine.requests)
    best = result.beams[0]
    assert best.token_values.shape == (8, 1)
    assert best.raw.tolist() == [best.token_ids.count(7) / 8]  # the mean of its tokens' head outputs
    plain = ScriptedEngine()
    plain_sevens = np.mean([s.token_ids.count(7) for s in asyncio.run(plain.sample(
        EngineRequest(PROMPT, 64, 8, Sampling(seed=5))))])
    assert best.token_ids.count(7) >= 2 * max(plain_sevens, 0.5)


@pytest.mark.parametrize("engine,chain", [
    (ScriptedEngine(), HeadChain([1.0])),  # the engine cannot evaluate heads
    (HeadEngine(), HeadChain([1.0, 1.0], links=((None, 1.0),) * 3, value_heads=((0.0,),) * 3)),  # too many
    (HeadEngine(), HeadChain([1.0], value_heads=None)),  # a member needs its own backbone
])
def test_the_scorer_values_candidates_when_the_engine_cannot(engine, chain):
    scorer = CountingScorer(3)
    params = SearchParams(mode="bon", w=1, k=4, l=8, max_tokens=8, sampling=Sampling(seed=1))
    result = asyncio.run(Searcher(engine, scorer, decode=decode).run(chain, PROMPT, params))
    assert scorer.calls == 1 and result.candidates_scored == 4
    assert all(r.value_heads is None for r in engine.requests)


def test_every_chunk_samples_with_the_requests_adapter():
    """A `<policy>+<value>` request: each chunk of both modes goes to the engine with the policy's adapter."""
    for mode in ("cbs", "bon"):
        engine = ScriptedEngine()
        run(engine, CountingScorer(3), mode=mode, adapter="policy-adapter")
        assert engine.requests and all(r.adapter == "policy-adapter" for r in engine.requests)
    engine = ScriptedEngine()
    run(engine, CountingScorer(3))
    assert all(r.adapter is None for r in engine.requests)
