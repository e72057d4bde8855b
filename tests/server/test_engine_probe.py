"""The loader's engine probe: a new engine value is checked by the serving engine, from the
loader's thread, with the heads the engine computes; otherwise the probe declines (None)."""

from __future__ import annotations

import asyncio

from server.engine import PROBE_IDS, engine_value_probe
from tests.server.test_search import HeadEngine, ScriptedEngine


def _from_a_thread(engine, heads, layers=None):
    async def main():
        probe = engine_value_probe(engine, asyncio.get_running_loop())
        return await asyncio.to_thread(probe, heads, layers)  # as the value manager runs the loader

    return asyncio.run(main())


def test_the_probe_runs_the_heads_in_the_engine_on_the_test_sequence():
    engine = HeadEngine()
    values = _from_a_thread(engine, ((0.5, -1.0, 0.0),))
    (request,) = engine.requests
    assert request.prompt_ids == PROBE_IDS and request.max_tokens == 1 and request.value_heads == ((0.5, -1.0, 0.0),)
    assert values == [[0.0]] or values == [[1.0]]  # one sampled token, one head (HeadEngine: 1 for token 7)


def test_the_probe_declines_what_the_engine_does_not_compute():
    assert _from_a_thread(ScriptedEngine(), ((0.5, -1.0, 0.0),)) is None  # no engine heads at all
    assert _from_a_thread(HeadEngine(), ((0.5,),) * 3) is None  # more heads than it evaluates
    assert _from_a_thread(HeadEngine(), ((0.5,),), layers=(2,)) is None  # layers it does not expose
