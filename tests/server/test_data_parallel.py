"""Data parallel engines: a search's chunk requests all go to one engine (one prefix cache)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from common.sampling import Sampling
from server.engine import EngineRequest, VllmEngine
from server.search import SearchParams, Searcher
from tests.server.test_search import Chain, CountingScorer, ScriptedEngine, decode


def _engine(dp: int) -> VllmEngine:
    engine = VllmEngine.__new__(VllmEngine)
    engine._llm = SimpleNamespace(vllm_config=SimpleNamespace(parallel_config=SimpleNamespace(data_parallel_size=dp)))
    return engine


def test_affinity_picks_the_data_parallel_engine_only_when_there_are_several():
    request = EngineRequest([1, 2], n=1, max_tokens=1, affinity=7)
    assert _engine(1)._dp_rank(request) is None
    assert _engine(4)._dp_rank(request) == 3
    assert _engine(4)._dp_rank(EngineRequest([1, 2], n=1, max_tokens=1)) is None


def test_every_chunk_of_a_search_carries_its_prompts_affinity():
    engine = ScriptedEngine()
    params = SearchParams(mode="cbs", w=2, k=2, l=2, max_tokens=6, sampling=Sampling(seed=1))
    for prompt in ([3, 3, 3], [4, 4]):
        asyncio.run(Searcher(engine, CountingScorer(len(prompt)), decode=decode).run(Chain([1.0]), prompt, params))
    first = {r.affinity for r in engine.requests if r.prompt_ids[:3] == [3, 3, 3]}
    second = {r.affinity for r in engine.requests if r.prompt_ids[:2] == [4, 4] and r.prompt_ids[2:3] != [4]}
    assert len(first) == 1 and len(second) == 1 and first != second
