"""From a request to a search: modes, budgets (planned widths, reasoning_effort) and every refusal,
through the app with a scripted engine and value (no vLLM, no model)."""

from __future__ import annotations


import numpy as np
import pytest

from server.engine import Sample
from server.guided import GuidedGenerator, plan_widths
from server.openai.serving import OpenAIServing
from tests.server.conftest import OneValue, ScriptedEngine, make_client

class _Scorer:
    async def values(self, chain, items):  # prefers more "b"s
        return np.array([[float(list(it.token_ids[it.response_start:]).count(98))] for it in items])


class _ChunkEngine(ScriptedEngine):
    """Chunks of letters a..e (seeded), cut at a stop string or a chunk delimiter as vLLM does."""

    def __init__(self):
        super().__init__()
        self.chunks = []

    async def sample(self, request):
        self.chunks.append(request)
        rng = np.random.default_rng(request.sampling.seed)
        out = []
        for _ in range(request.n):
            text, why = "", None
            for _ in range(request.max_tokens):
                text += "abcde"[rng.integers(5)]
                why = next((s for s in request.sampling.stop + request.chunk_until if s in text), None)
                if why:
                    break
            out.append(Sample([ord(c) for c in text], text, "stop" if why else "length", why))
        return out


_CLIENTS: dict = {}


def client(**settings):
    """One app per settings for the whole module (building one is the slow part); a fresh engine each time."""
    key = repr(sorted(settings.items()))
    if key not in _CLIENTS:
        _CLIENTS[key] = make_client(_ChunkEngine(), **settings)
    c = _CLIENTS[key]
    engine = _ChunkEngine()
    s = c.app.state.settings
    guided = GuidedGenerator(engine, _Scorer(), OneValue(w=4, k=4, l=4), max_candidates=s.max_guided_candidates,
                             max_steps=s.max_guided_steps, effort_budgets=s.reasoning_effort_budgets,
                             pf_temperature=s.pf_temperature)
    c.app.state.serving = OpenAIServing(engine, max_n=s.max_n, guided=guided, values=OneValue(w=4, k=4, l=4))
    return c, engine


def complete(c, *, model="tiny+v", **body):
    return c.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 8, "temperature": 0.8,
                                           "seed": 1} | body)


@pytest.mark.parametrize("mode", ["cbs", "bon", "pf", "dvts"])
def test_every_mode_answers_with_its_metadata(mode):
    c, engine = client()
    r = complete(c, guidance={"mode": mode}, n=2)
    assert r.status_code == 200, r.text
    body = r.json()
    g = body["guidance"]
    assert g["mode"] == mode and len(body["choices"]) == 2
    assert g["tokens"] == body["usage"]["completion_tokens"] > 0
    assert (g["s"] is not None) == (mode == "dvts") and g["stopped_by"] is None
    expected_k = {"pf": 16, "dvts": 4}.get(mode, 4)  # pf: the value's w*k particles; dvts: w subtrees of one beam
    assert g["k"] == expected_k
    if mode == "dvts":
        assert (g["s"], g["w"]) == (4, 1)


def test_pf_resamples_at_the_servers_temperature_unless_the_request_sets_beta():
    c, _ = client()
    assert complete(c, guidance={"mode": "pf"}).json()["guidance"]["pf_temperature"] == 0.1  # the setting's default
    assert complete(c, guidance={"mode": "pf", "beta": 1.0}).json()["guidance"]["pf_temperature"] == 1.0  # beta is it
    assert complete(c, guidance={"mode": "cbs"}).json()["guidance"]["pf_temperature"] is None
    warm, _ = client(pf_temperature=2.0)
    assert complete(warm, guidance={"mode": "pf"}).json()["guidance"]["pf_temperature"] == 2.0


def test_usage_is_the_search_tokens():
    c, engine = client()
    body = complete(c, guidance={"mode": "pf", "k": 3}).json()
    assert body["usage"]["completion_tokens"] == body["guidance"]["tokens"] == 3 * 8


@pytest.mark.parametrize("mode,budget,planned", [
    ("cbs", 64, {"w": 2, "k": 4}), ("cbs", 8, {"w": 1, "k": 1}), ("pf", 40, {"k": 5}), ("bon", 24, {"k": 3}),
    ("dvts", 96, {"s": 3, "w": 1, "k": 4}),
])
def test_budget_plans_the_widths_and_bounds_the_tokens(mode, budget, planned):
    c, _ = client()
    g = complete(c, guidance={"mode": mode, "budget_tokens": budget}).json()["guidance"]
    assert {f: g[f] for f in planned} == planned and sorted(g["planned"]) == sorted(planned)
    assert g["budget_tokens"] == budget and g["budget_from"] == "budget_tokens" and g["tokens"] <= budget


def test_a_budget_below_the_search_stops_it_with_the_best_so_far():
    c, _ = client()
    body = complete(c, max_tokens=16, guidance={"w": 2, "k": 2, "l": 4, "budget_tokens": 20}).json()
    g = body["guidance"]
    assert g["stopped_by"] == "budget" and g["tokens"] <= 20 and g["planned"] == []
    assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["text"]


@pytest.mark.parametrize("effort,factor", [("none", 1), ("low", 4), ("high", 32)])
def test_reasoning_effort_maps_to_the_servers_budget(effort, factor):
    c, _ = client()
    g = complete(c, reasoning_effort=effort, guidance={"mode": "pf"}).json()["guidance"]
    assert g["budget_tokens"] == factor * 8 and g["budget_from"] == "reasoning_effort"
    assert g["reasoning_effort"] == effort and g["k"] == factor and g["tokens"] <= factor * 8


def test_reasoning_effort_budgets_come_from_the_settings():
    c, _ = client(reasoning_effort_budgets={"high": 3.0})
    g = complete(c, reasoning_effort="high").json()["guidance"]
    assert g["budget_tokens"] == 24
    assert complete(c, reasoning_effort="low").json()["guidance"]["budget_tokens"] == 32  # the default stays


def test_reasoning_effort_none_on_a_plain_model_is_plain_sampling():
    c, engine = client()
    r = complete(c, model="tiny", reasoning_effort="none")
    assert r.status_code == 200, r.text
    assert r.json().get("guidance") is None and not engine.chunks


def test_chunk_until_reaches_every_chunk_and_is_reported():
    c, engine = client()
    g = complete(c, max_tokens=16, guidance={"chunk_until": ["c"], "w": 2, "k": 2}).json()["guidance"]
    assert g["chunk_until"] == ["c"] and all(ch.chunk_until == ("c",) for ch in engine.chunks)
    assert g["steps"] > 16 / 4  # chunks ended early at "c"
    g = complete(c, guidance={"chunk_until": "steps"}).json()["guidance"]
    assert g["chunk_until"] == ["\n\n"]


def test_deadline_is_reported():
    c, _ = client()
    g = complete(c, guidance={"deadline_ms": 60_000}).json()["guidance"]
    assert g["deadline_ms"] == 60_000 and g["stopped_by"] is None and g["elapsed_ms"] >= 0


@pytest.mark.parametrize("body,param", [
    ({"guidance": {"mode": "greedy"}}, "guidance.mode"),
    ({"guidance": {"w": 4, "k": 4, "budget_tokens": 63}}, "guidance.budget_tokens"),  # w*k*l = 64 for one step
    ({"guidance": {"mode": "pf", "budget_tokens": 3}}, "guidance.budget_tokens"),  # one particle's chunk: 4
    ({"guidance": {"mode": "bon", "k": 4, "budget_tokens": 3}}, "guidance.budget_tokens"),
    ({"guidance": {"budget_tokens": 0}}, "guidance.budget_tokens"),
    ({"guidance": {"deadline_ms": 0}}, "guidance.deadline_ms"),
    ({"guidance": {"s": 2}}, "guidance.s"),
    ({"guidance": {"mode": "pf", "w": 2}}, "guidance.w"),
    ({"guidance": {"mode": "bon", "chunk_until": ["\n"]}}, "guidance.chunk_until"),
    ({"guidance": {"chunk_until": "paragraphs"}}, "guidance.chunk_until"),
    ({"guidance": {"chunk_until": [""]}}, "guidance.chunk_until.0"),
    ({"guidance": {"mode": "dvts", "s": 8, "w": 4, "k": 4}}, "guidance.s"),
    ({"guidance": {"mode": "pf", "k": 65}}, "guidance.k"),
    ({"guidance": {"mode": "dvts", "s": 2, "w": 1}, "n": 3}, "n"),
    ({"guidance": {"mode": "pf", "k": 2}, "n": 3}, "n"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"reasoning_effort": "high", "guidance": {"budget_tokens": 100}}, "reasoning_effort"),
    ({"reasoning_effort": "none", "guidance": {"w": 4, "k": 4}}, "reasoning_effort"),  # 8 tokens < w*k*l
    ({"reasoning_effort": "high", "model": "tiny"}, "reasoning_effort"),  # a plain model does no search
])
def test_refusals_are_400s_naming_the_field(body, param):
    c, engine = client()
    r = complete(c, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"], err
    assert not engine.chunks  # refused before any work
