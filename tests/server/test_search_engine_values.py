"""Engine values that are not finite never choose a beam: the step is valued by the scorer,
counted, and logged once (the engine hands back NaN for layers it does not expose, and a broken
head or hidden state can give inf or NaN)."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from common.sampling import Sampling
from server.search import SearchParams, Searcher
from tests.server.test_search import PROMPT, CountingScorer, HeadChain, HeadEngine, decode


class NanEngine(HeadEngine):
    """Head outputs of token 7 are 1, of token 3 NaN (or `bad`), else 0: a value that ranks by NaN
    or inf would pick beams full of 3s."""

    def __init__(self, bad=float("nan")):
        super().__init__()
        self.bad = bad

    async def sample(self, request):
        samples = await super().sample(request)
        for s in samples:
            if s.token_values is not None:
                s.token_values = [[self.bad if t == 3 else row[0]] * len(row) for t, row in zip(s.token_ids, s.token_values)]
        return samples


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_engine_values_fall_back_to_the_scorer_counted_and_logged_once(bad, caplog):
    scorer, engine = CountingScorer(3, target=7), NanEngine(bad)
    fallbacks = []
    searcher = Searcher(engine, scorer, decode=decode, on_engine_fallback=lambda: fallbacks.append(1))
    params = SearchParams(mode="cbs", w=2, k=4, l=2, max_tokens=8, sampling=Sampling(seed=3))
    with caplog.at_level(logging.WARNING, logger="server.search"):
        result = asyncio.run(searcher.run(HeadChain([1.0]), PROMPT, params))
    assert scorer.calls == len(fallbacks) > 0  # every step with a non-finite value went to the scorer
    assert all(np.isfinite(b.raw).all() for b in result.beams)  # no beam was ranked by NaN / inf
    assert caplog.text.count("engine values were not finite") == 1
    assert result.beams[0].token_ids.count(7) >= 2  # the scorer (7s) chose, not the non-finite 3s


def test_finite_engine_values_never_call_the_scorer():
    scorer, engine = CountingScorer(3, target=1), NanEngine(bad=0.0)
    fallbacks = []
    searcher = Searcher(engine, scorer, decode=decode, on_engine_fallback=lambda: fallbacks.append(1))
    params = SearchParams(mode="bon", w=1, k=4, l=8, max_tokens=8, sampling=Sampling(seed=1))
    asyncio.run(searcher.run(HeadChain([1.0]), PROMPT, params))
    assert scorer.calls == 0 and not fallbacks
