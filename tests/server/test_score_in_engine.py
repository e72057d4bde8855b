"""`/v1/score` of engine values runs in the engine (heads at prompt positions), not the scorer;
anything the engine does not compute, or a non-finite value, goes to the scorer."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from common.protocol import ScoreRequest
from server.engine import Sample
from server.openai.serving_score import ScoreServing
from tests.server.conftest import OneValue, ScriptedEngine
from tests.server.test_sampling import _Scorer


ENGINE_VALUE = dict(value_heads=((0.5, 0.0),))
"""One engine value on the final normed hidden state."""


class PromptValueEngine(ScriptedEngine):
    """Values prompt positions: the value of token i is i (its index), or `bad` at the last one."""

    max_value_heads, value_layers, values_prompts = 4, (), True

    def __init__(self, bad: float | None = None):
        super().__init__()
        self.bad, self.requests = bad, []

    async def sample(self, request):
        self.requests.append(request)
        values = [[]] + [[float(i)] * len(request.value_heads) for i in range(1, len(request.prompt_ids))]
        if self.bad is not None:
            values[-1] = [self.bad] * len(request.value_heads)
        return [Sample([0], "", "length", prompt_values=values)]


class CountingScorer(_Scorer):
    calls = 0

    async def values(self, chain, items):
        self.calls += 1
        return await super().values(chain, items)


def _score(engine, value, scorer):
    serving = ScoreServing(engine, scorer, OneValue(**value))
    request = ScoreRequest(value="v", prompt="hi", responses=["a", "abcd"])
    return asyncio.run(serving.score(request))


def test_engine_values_are_scored_in_the_engine_as_the_mean_over_the_response_tokens():
    engine, scorer = PromptValueEngine(), CountingScorer()
    body = _score(engine, ENGINE_VALUE, scorer)
    assert scorer.calls == 0 and all(r.prompt_values and r.value_heads == ((0.5, 0.0),) for r in engine.requests)
    prompt = len("hi")  # the scripted tokenizer: one token per byte
    assert body.values == [[float(prompt)], [np.mean(range(prompt, prompt + 4))]]  # tokens 2 / 2..5


@pytest.mark.parametrize("engine,value", [
    (PromptValueEngine(bad=float("nan")), ENGINE_VALUE),  # a non-finite value
    (ScriptedEngine(), ENGINE_VALUE),  # an engine without heads
    (PromptValueEngine(), {**ENGINE_VALUE, "value_layers": (2,)}),  # layers the engine does not expose
    (PromptValueEngine(), {}),  # not an engine value
])
def test_the_scorer_scores_what_the_engine_does_not(engine, value):
    scorer = CountingScorer()
    body = _score(engine, value, scorer)
    assert scorer.calls == 1 and np.isfinite(body.values).all()
