"""PF, DVTS, step-aware chunks, token budgets and deadlines: the invariants of each, against the
scripted engine and scorer of tests/server/test_search.py (no vLLM, no model)."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from common.sampling import Sampling
from server.engine import EngineRequest, Sample
from server.search import Searcher, SearchParams, fit_budget, resample
from tests.server.test_search import EOS, PROMPT, Chain, CountingScorer, ScriptedEngine, decode


class Clock:
    """A clock that `TickingScorer` advances by one second per search step (no real time involved)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class StepEngine(ScriptedEngine):
    """ScriptedEngine that ends a sample at a stop string as vLLM does: the request's `stop` and its
    `chunk_until` are checked on the text of this request's output only, the string is kept and
    named as `stop_reason`. Counts every token it returns."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.tokens = 0

    async def sample(self, request: EngineRequest) -> list[Sample]:
        self.requests.append(request)
        await asyncio.sleep(0)
        rng = random.Random(request.sampling.seed)
        stops = tuple(request.sampling.stop) + tuple(request.chunk_until)
        out = []
        for _ in range(request.n):
            ids, reason, why = [], "length", None
            for _ in range(request.max_tokens):
                ids.append(rng.randint(1, 9))
                if self.eos_on_9 and ids[-1] == 9:
                    ids.append(EOS)
                    reason = "stop"
                    break
                text = decode(ids)
                hit = next((s for s in stops if s in text), None)
                if hit is not None:
                    reason, why = "stop", hit
                    break
            self.tokens += len(ids)
            out.append(Sample(ids, decode(ids), reason, why))
        return out


class TickingScorer(CountingScorer):
    """CountingScorer on a clock: each step (one scoring call) takes one second."""

    def __init__(self, clock: Clock, *args, **kw):
        super().__init__(*args, **kw)
        self.clock = clock

    async def values(self, chain, items):
        self.clock.now += 1.0
        return await super().values(chain, items)


def params(**kw) -> SearchParams:
    sampling = Sampling(temperature=0.7, seed=kw.pop("seed", 1), stop=kw.pop("stop", ()))
    return SearchParams(**({"mode": "cbs", "w": 2, "k": 4, "l": 4, "max_tokens": 16, "sampling": sampling} | kw))


def search(engine, scorer, p: SearchParams, clock=None):
    searcher = Searcher(engine, scorer, decode=decode, **({"clock": clock} if clock else {}))
    return asyncio.run(searcher.run(Chain([1.0]), PROMPT, p))


# ----------------------------------------------------------------------------- particle filtering
def test_resampling_is_proportional_to_softmax_of_the_scores():
    scores = np.array([0.0, 1.0, 2.0, -1.0, 0.5])
    weights = np.exp(scores) / np.exp(scores).sum()
    draws = resample(scores, 20_000, np.random.default_rng(1234))
    counts = np.bincount(draws, minlength=len(scores))
    expected = weights * len(draws)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.47, (counts, expected)  # the 0.999 quantile of chi-square with 4 degrees of freedom
    assert counts[2] > counts[1] > counts[4] > counts[0] > counts[3]
    # a temperature (beta) flattens the weights: scores / 100 draw almost uniformly
    flat = np.bincount(resample(scores / 100, 20_000, np.random.default_rng(1234)), minlength=5) / 20_000
    assert np.abs(flat - 0.2).max() < 0.02


def test_pf_prefers_what_the_value_prefers_and_a_seed_reproduces_it():
    results = [search(StepEngine(), CountingScorer(3), params(mode="pf", k=8, seed=s)) for s in range(8)]
    sevens = np.mean([r.beams[0].token_ids.count(7) for r in results])
    assert sevens >= 4  # plain sampling: 16 tokens / 9 ~ 1.8 sevens
    again = search(StepEngine(), CountingScorer(3), params(mode="pf", k=8, seed=3))
    assert again.beams[0].token_ids == results[3].beams[0].token_ids
    assert any(r.beams[0].token_ids != results[3].beams[0].token_ids for r in results[:3])


def test_a_colder_pf_temperature_follows_the_value_more_closely():
    def sevens(temperature):
        return np.mean([search(StepEngine(), CountingScorer(3), params(mode="pf", k=8, seed=s,
                                                                       pf_temperature=temperature))
                        .beams[0].token_ids.count(7) for s in range(8)])

    assert sevens(0.05) > sevens(20.0)  # hot: resampling is almost uniform, close to plain sampling


def test_pf_extends_every_particle_by_one_chunk_per_step_in_one_request_per_distinct_particle():
    engine = StepEngine()
    result = search(engine, CountingScorer(3), params(mode="pf", k=6, l=4, max_tokens=12))
    by_step: dict[int, list[EngineRequest]] = {}
    for r in engine.requests:
        by_step.setdefault(len(r.prompt_ids), []).append(r)
    assert [sum(r.n for r in rs) for _, rs in sorted(by_step.items())] == [6, 6, 6]  # k samples every step
    assert len(by_step[len(PROMPT)]) == 1  # the k particles of the prompt: one request
    for rs in by_step.values():  # resampled copies of one particle share a request
        prefixes = [tuple(r.prompt_ids) for r in rs]
        assert len(prefixes) == len(set(prefixes))
    assert result.candidates_generated == 18 and result.completion_tokens == 72


# ----------------------------------------------------------------------------- dvts
class FirstTokenScorer(CountingScorer):
    """V = the response's first token: every beam search collapses onto the best first chunk."""

    async def values(self, chain, items):
        return np.array([[float(it.token_ids[self.prompt_len])] for it in items])


def test_dvts_subtrees_are_independent_beam_searches():
    engine = StepEngine()
    result = search(engine, FirstTokenScorer(3), params(mode="dvts", s=4, w=1, k=4, n=4))
    first = engine.requests[0]
    assert first.prompt_ids == PROMPT and first.n == 16  # one request for all subtrees' first chunks
    samples = asyncio.run(StepEngine().sample(first))
    for beam in result.beams:  # each answer grew from its own subtree's share of the first samples
        own = [s.token_ids for s in samples[beam.group * 4:(beam.group + 1) * 4]]
        assert beam.token_ids[:4] in own
        assert beam.token_ids[0] == max(ids[0] for ids in own)  # the best of its own subtree, not of all
    assert sorted(b.group for b in result.beams) == [0, 1, 2, 3]
    # one beam search over the same samples keeps only the best first chunks
    cbs = search(StepEngine(), FirstTokenScorer(3), params(mode="cbs", w=4, k=4, n=4))
    assert len({b.token_ids[0] for b in cbs.beams}) <= len({b.token_ids[0] for b in result.beams})
    assert all(b.token_ids[0] == max(s.token_ids[0] for s in samples) for b in cbs.beams)


def test_dvts_each_subtree_keeps_w_beams_and_k_successors():
    engine = StepEngine()
    search(engine, CountingScorer(3), params(mode="dvts", s=3, w=2, k=2, l=4, max_tokens=8))
    later = engine.requests[1:]
    assert engine.requests[0].n == 12 and len(later) == 6 and all(r.n == 2 for r in later)


# ----------------------------------------------------------------------------- every chunked mode
MODES = [dict(mode="cbs", w=2, k=3), dict(mode="pf", k=6), dict(mode="dvts", s=2, w=1, k=3)]


def chunk_ends_by_the_rule(ids: list[int], ends: tuple[int, ...], delimiters: tuple[str, ...], l: int) -> int:
    """Assert the step-aware chunk rule on one answer: a chunk ends right after the first delimiter that
    ends past the previous chunk's text (the answer's text decides, so a delimiter may begin in the
    previous chunk unless that one ended at a delimiter), or after `l` tokens when there is none. Returns
    how many chunks ended at a delimiter."""
    at_delimiter = 0
    for a, b in zip((0,) + ends[:-1], ends):
        before, text = decode(ids[:a]), decode(ids[:b])
        straddle = not before.endswith(delimiters)
        found = [i + len(d) for d in delimiters
                 if (i := text.find(d, max(0, len(before) - (len(d) - 1) * straddle))) >= 0]
        if found:
            assert min(found) == len(text), (before, text)
            at_delimiter += 1
        else:
            assert b - a == min(l, len(ids) - a), (before, text)
    return at_delimiter


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m["mode"])
def test_a_chunk_ends_exactly_at_a_delimiter_or_after_l_tokens(mode):
    engine = StepEngine()
    result = search(engine, CountingScorer(3), params(**mode, l=6, max_tokens=24, chunk_until=("e", "ca")))
    assert all(r.chunk_until == ("e", "ca") for r in engine.requests)
    ended_at_delimiter = 0
    for beam in result.beams:
        assert len(beam.token_ids) == 24 and beam.finish_reason == "length"  # a delimiter ends a chunk only
        ended_at_delimiter += chunk_ends_by_the_rule(beam.token_ids, beam.chunk_ends, ("e", "ca"), 6)
    assert ended_at_delimiter > 0


class TextEngine(StepEngine):
    """Every sample continues `text` (letters: token i is the i-th letter) from where its prompt ends,
    ending at a stop string of its own output as vLLM does (`StepEngine`)."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    async def sample(self, request: EngineRequest) -> list[Sample]:
        self.requests.append(request)
        start = len(request.prompt_ids) - len(PROMPT)
        stops = tuple(request.sampling.stop) + tuple(request.chunk_until)
        ids, reason, why = [], "length", None
        for c in self.text[start:start + request.max_tokens]:
            ids.append(ord(c) - ord("a") + 1)
            if (why := next((s for s in stops if s in decode(ids)), None)) is not None:
                reason = "stop"
                break
        self.tokens += len(ids) * request.n
        return [Sample(list(ids), decode(ids), reason, why) for _ in range(request.n)]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m["mode"])
def test_a_delimiter_split_across_two_chunks_ends_the_second(mode):
    """"cc" with the first chunk cut at l=4 tokens after one "c" and the next beginning with the other:
    the engine sees no "cc" in the second chunk's own text, the search does and ends the chunk there."""
    engine = TextEngine("abac" "cabd" "cc" "dabc" "ccab" "dddd")
    result = search(engine, CountingScorer(3), params(**mode, l=4, max_tokens=20, chunk_until=("cc",)))
    beam = result.beams[0]
    assert decode(beam.token_ids) == "abaccabdccdabcccabdd"
    # "abac|c|abdc|c|dabc|c|cabd|d": no delimiter reuses the "c" of the one that ended the chunk before
    assert beam.chunk_ends == (4, 5, 9, 10, 14, 15, 19, 20)
    chunk_ends_by_the_rule(beam.token_ids, beam.chunk_ends, ("cc",), 4)
    # the tokens generated past the delimiter are dropped from the candidate but counted as spent
    assert result.completion_tokens == engine.tokens > sum(len(b.token_ids) for b in result.beams)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m["mode"])
def test_delimiters_straddling_random_chunk_boundaries(mode):
    straddled = 0
    for seed in range(6):
        result = search(StepEngine(), CountingScorer(3),
                        params(**mode, seed=seed, n=2, l=3, max_tokens=24, chunk_until=("ca", "ge", "hh")))
        for beam in result.beams:
            chunk_ends_by_the_rule(beam.token_ids, beam.chunk_ends, ("ca", "ge", "hh"), 3)
            ids = beam.token_ids
            straddled += sum(decode(ids[e - 1:e + 1]) in ("ca", "ge", "hh")
                             and not decode(ids[:e]).endswith(("ca", "ge", "hh")) for e in beam.chunk_ends[:-1])
    assert straddled > 0  # the draws did split a delimiter somewhere


def test_the_requests_stop_still_ends_the_answer_with_chunk_delimiters():
    result = search(StepEngine(), CountingScorer(3), params(l=6, max_tokens=40, chunk_until=("e",), stop=("ca",)))
    for beam in result.beams:
        assert "ca" not in beam.text
        assert beam.finish_reason == "stop" or len(beam.token_ids) == 40


@pytest.mark.parametrize("mode", MODES + [dict(mode="bon", k=6)], ids=lambda m: m["mode"])
@pytest.mark.parametrize("budget", [7, 40, 100, 1000])
def test_the_token_budget_is_never_exceeded_and_counted_exactly(mode, budget):
    engine = StepEngine()
    result = search(engine, CountingScorer(3), params(**mode, budget_tokens=budget, chunk_until=()))
    assert result.completion_tokens == engine.tokens  # every generated token counted
    assert result.completion_tokens <= budget
    full = search(StepEngine(), CountingScorer(3), params(**mode))
    if full.completion_tokens > budget:  # the budget stopped it: the best so far, unfinished
        assert result.stopped_by == "budget"
        assert result.beams and all(b.finish_reason in ("length", "stop") for b in result.beams)
    else:
        assert result.stopped_by is None and result.completion_tokens == full.completion_tokens


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m["mode"])
def test_a_deadline_returns_the_best_partial_answer_after_the_step_in_flight(mode):
    clock = Clock()
    result = search(StepEngine(), TickingScorer(clock, 3), params(**mode, l=2, max_tokens=40, deadline_s=3.5),
                    clock=clock)
    assert result.stopped_by == "deadline"
    assert result.elapsed_s <= 3.5 + 1  # past the deadline by at most the step that was in flight
    best = result.beams[0]
    assert 0 < len(best.token_ids) < 40 and best.finish_reason == "length"
    assert best.score == max(b.score for b in result.beams)
    assert result.steps == 4  # steps start at 0, 1, 2 and 3 s; at 4 s the deadline had passed
    unhurried = search(StepEngine(), CountingScorer(3), params(**mode, l=2, max_tokens=40))
    assert unhurried.stopped_by is None and len(unhurried.beams[0].token_ids) == 40


def test_the_first_step_runs_even_when_the_deadline_has_passed():
    clock = Clock()
    clock.now = 10.0
    searcher = Searcher(StepEngine(), CountingScorer(3), decode=decode, clock=clock)
    result = asyncio.run(searcher.run(Chain([1.0]), PROMPT, params(deadline_s=0.001), started=0.0))
    assert result.steps == 1 and result.stopped_by == "deadline" and result.beams[0].token_ids


@pytest.mark.parametrize("mode", [dict(mode="cbs", w=3, k=3), dict(mode="pf", k=6), dict(mode="dvts", s=3, w=1, k=3),
                                  dict(mode="bon", k=6)], ids=lambda m: m["mode"])
def test_n_distinct_answers_best_first(mode):  # n up to the beams: w, k particles, s*w, k
    result = search(StepEngine(), CountingScorer(3), params(**mode, n=3, max_tokens=12))
    texts = [b.text for b in result.beams]
    assert len(texts) == 3 and len(set(texts)) == 3
    assert [b.score for b in result.beams] == sorted((b.score for b in result.beams), reverse=True)


def test_eos_finishes_a_particle_and_finished_particles_stay_in_the_population():
    result = search(StepEngine(eos_on_9=True), CountingScorer(3, bonus={EOS: 50.0}),
                    params(mode="pf", k=8, max_tokens=30))
    best = result.beams[0]
    assert best.finish_reason == "stop" and best.token_ids[-2:] == [9, EOS]


def test_fit_budget_cuts_every_chunk_to_an_equal_share():
    assert fit_budget([(3, 4), (1, 2)], None) == [4, 2]
    assert fit_budget([(3, 4), (1, 2)], 14) == [4, 2]
    assert fit_budget([(3, 4), (1, 2)], 9) == [2, 2]
    assert fit_budget([(3, 4), (1, 2)], 3) is None


def test_doctests_of_the_search_modules():
    import doctest

    import common.search_settings
    import server.guided
    import server.search

    for module in (server.search, server.guided, common.search_settings):
        assert doctest.testmod(module).failed == 0, module.__name__
